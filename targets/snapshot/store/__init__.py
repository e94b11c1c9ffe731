"""Snapshot exception stores (the kernel's ``dm-exception-store.c``).

Two types, under the kernel's letters (only the first letter of the type word
picks the type; the rest are options):

* ``P`` -- persistent: the kernel's on-disk "SnAp" v1 format
  (``persistent.py``, format in ``dmuser.formats.cow``); survives a reload.
  Option ``O``: userspace supports overflow.
* ``N`` -- transient: nothing on disk (``transient.py``).

The protocol between a store and the snapshot is :class:`ExceptionStore`
(``base.py``).  Table syntax (dm-spec §3.1): ``<P|PO|N...> <chunk_size>``.
:func:`create_store` raises :class:`StoreArgError` with the kernel's inner
``ti->error`` text; the snapshot constructor logs it and reports "Couldn't
create exception store".
"""

from __future__ import annotations

from collections.abc import Sequence

from dmuser.core.blockdev import BlockDevice
from dmuser.targets.snapshot.store.base import (
    U32_MAX,
    CowFullError,
    ExceptionStore,
    StoreArgError,
    StoreError,
    check_chunk_size,
)
from dmuser.targets.snapshot.store.persistent import PersistentStore
from dmuser.targets.snapshot.store.transient import TransientStore

#: The store types by the first letter of the table's type word.
STORE_TYPES: dict[str, type[ExceptionStore]] = {"P": PersistentStore, "N": TransientStore}


def parse_chunk_size(word: str) -> int:
    """kstrtouint(word, 10): an optional '+', decimal digits, an optional trailing newline."""
    text = word[:-1] if word.endswith("\n") else word
    text = text[1:] if text.startswith("+") else text
    if not text.isascii() or not text.isdigit() or int(text) > U32_MAX:
        raise StoreArgError("Invalid chunk size")
    return int(text)



def create_store(words: Sequence[str], cow: BlockDevice, origin: BlockDevice) -> ExceptionStore:
    """``dm_exception_store_create`` from the words ``<type> <chunk_size>``.

    Raises:
        StoreArgError: with the kernel's inner message (see the module docstring).
    """
    if len(words) < 2:
        raise StoreArgError("Insufficient exception store arguments")
    cls = STORE_TYPES.get(words[0][:1].upper())
    if cls is None:
        raise StoreArgError("Exception store type is not P or N")
    chunk_size = parse_chunk_size(words[1])
    if chunk_size:
        check_chunk_size(chunk_size, cow, origin)
    return cls(cow, origin, chunk_size, words[0][1:])


__all__ = ["STORE_TYPES", "CowFullError", "ExceptionStore", "PersistentStore", "StoreArgError",
           "StoreError", "TransientStore", "create_store"]
