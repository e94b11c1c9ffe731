"""The NBD wire format (``doc/proto.md`` of NetworkBlockDevice/nbd): bytes only, no I/O.

Only the fixed-newstyle handshake, simple replies and the structured reply
chunks dmuser sends are encoded here; what dmuser speaks of it is in
``docs/nbd.md``.  All integers are big-endian ("network byte order").  The layouts:

* server greeting: ``NBDMAGIC`` u64, ``IHAVEOPT`` u64, handshake flags u16;
  the client answers with its flags, u32.
* option (client): ``IHAVEOPT`` u64, option u32, length u32, data.
* option reply (server): ``REPLY_MAGIC`` u64, option u32, reply type u32,
  length u32, data.
* ``NBD_OPT_INFO``/``NBD_OPT_GO`` data: name length u32, name, number of info
  requests u16, info types u16 each.
* ``NBD_REP_INFO`` data: info type u16, then for ``NBD_INFO_EXPORT`` size u64 and
  transmission flags u16; for ``NBD_INFO_BLOCK_SIZE`` minimum, preferred and
  maximum u32.
* ``NBD_OPT_EXPORT_NAME`` reply (no option-reply header): size u64, transmission
  flags u16, 124 zero bytes unless both sides agreed on ``NO_ZEROES``.
* request: ``REQUEST_MAGIC`` u32, command flags u16, type u16, handle
  (cookie) u64, offset u64, length u32, then ``length`` bytes for a WRITE.
* simple reply: ``SIMPLE_REPLY_MAGIC`` u32, error u32, handle u64, then the
  data of a successful READ.
* structured reply chunk (after ``NBD_OPT_STRUCTURED_REPLY``):
  ``STRUCTURED_REPLY_MAGIC`` u32, flags u16 (``DONE``: the last chunk), type
  u16, handle u64, length u32, then the payload: for ``OFFSET_DATA`` offset
  u64 and data; for ``ERROR`` error u32, message length u16, message.

Decoders raise :class:`NbdProtocolError` for anything that does not parse.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

NBDMAGIC = 0x4E42444D41474943       # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054       # "IHAVEOPT"
REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

DEFAULT_PORT = 10809
#: the largest payload either side sends or accepts unless told otherwise (proto.md: 32 MiB)
MAX_PAYLOAD = 32 << 20
#: the longest option data a server reads (names are at most 4096 bytes)
MAX_OPTION_DATA = 64 << 10
EXPORT_NAME_PADDING = 124


class HandshakeFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlag(enum.IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_ERR = 1 << 31


class Rep(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _ERR + 1
    ERR_POLICY = _ERR + 2
    ERR_INVALID = _ERR + 3
    ERR_PLATFORM = _ERR + 4
    ERR_TLS_REQD = _ERR + 5
    ERR_UNKNOWN = _ERR + 6
    ERR_SHUTDOWN = _ERR + 7
    ERR_BLOCK_SIZE_REQD = _ERR + 8
    ERR_TOO_BIG = _ERR + 9

    @property
    def is_error(self) -> bool:
        return bool(self.value & _ERR)


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CmdFlag(enum.IntFlag):
    NONE = 0
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class ReplyFlag(enum.IntFlag):
    DONE = 1 << 0


class ReplyType(enum.IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


class Err(enum.IntEnum):
    """The error values a reply may carry (the Linux errno numbers, by the spec)."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


def error_for(errno_value: int) -> int:
    """The NBD error to send for ``errno_value``: itself if the spec allows it, else EIO
    (EROFS becomes EPERM, EOPNOTSUPP is ENOTSUP)."""
    if errno_value == 30:  # EROFS
        return Err.EPERM
    return errno_value if errno_value in Err._value2member_map_ else Err.EIO


class NbdProtocolError(Exception):
    """The peer sent bytes that are not NBD (bad magic, bad length, truncated data)."""


_GREETING = struct.Struct("!QQH")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_OPTION = struct.Struct("!QII")
_OPTION_REPLY = struct.Struct("!QIII")
_INFO_EXPORT = struct.Struct("!HQH")
_INFO_BLOCK_SIZE = struct.Struct("!HIII")
_EXPORT_NAME_REPLY = struct.Struct("!QH")
_REQUEST = struct.Struct("!IHHQQI")
_SIMPLE_REPLY = struct.Struct("!IIQ")
_CHUNK = struct.Struct("!IHHQI")
_U64 = struct.Struct("!Q")
_ERROR = struct.Struct("!IH")

GREETING_SIZE = _GREETING.size            # 18
CLIENT_FLAGS_SIZE = _U32.size             # 4
OPTION_HEADER_SIZE = _OPTION.size         # 16
OPTION_REPLY_HEADER_SIZE = _OPTION_REPLY.size  # 20
EXPORT_NAME_REPLY_SIZE = _EXPORT_NAME_REPLY.size  # 10, then the padding
REQUEST_SIZE = _REQUEST.size              # 28
SIMPLE_REPLY_SIZE = _SIMPLE_REPLY.size    # 16
CHUNK_HEADER_SIZE = _CHUNK.size           # 20


def _need(data: bytes | bytearray | memoryview, size: int, what: str) -> None:
    if len(data) < size:
        raise NbdProtocolError(f"{what}: {len(data)} bytes, need {size}")


# -- handshake -------------------------------------------------------------------------


def encode_greeting(flags: int) -> bytes:
    return _GREETING.pack(NBDMAGIC, IHAVEOPT, flags)


def decode_greeting(data: bytes | bytearray | memoryview) -> HandshakeFlag:
    _need(data, GREETING_SIZE, "greeting")
    magic, opt, flags = _GREETING.unpack_from(data)
    if magic != NBDMAGIC:
        raise NbdProtocolError(f"not an NBD server (magic {magic:#x})")
    if opt != IHAVEOPT:
        raise NbdProtocolError("not a newstyle NBD server (oldstyle is not supported)")
    return HandshakeFlag(flags)


def encode_client_flags(flags: int) -> bytes:
    return _U32.pack(flags)


def decode_client_flags(data: bytes | bytearray | memoryview) -> int:
    _need(data, CLIENT_FLAGS_SIZE, "client flags")
    return int(_U32.unpack_from(data)[0])


def encode_option(option: int, data: bytes = b"") -> bytes:
    return _OPTION.pack(IHAVEOPT, option, len(data)) + data


def decode_option_header(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(option, length of its data)."""
    _need(data, OPTION_HEADER_SIZE, "option header")
    magic, option, length = _OPTION.unpack_from(data)
    if magic != IHAVEOPT:
        raise NbdProtocolError(f"bad option magic {magic:#x}")
    return int(option), int(length)


def encode_option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return _OPTION_REPLY.pack(REPLY_MAGIC, option, reply, len(data)) + data


def decode_option_reply_header(data: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    """(option, reply type, length of its data)."""
    _need(data, OPTION_REPLY_HEADER_SIZE, "option reply header")
    magic, option, reply, length = _OPTION_REPLY.unpack_from(data)
    if magic != REPLY_MAGIC:
        raise NbdProtocolError(f"bad option reply magic {magic:#x}")
    return int(option), int(reply), int(length)


def encode_info_request(name: str, infos: tuple[int, ...] = ()) -> bytes:
    """The data of NBD_OPT_INFO / NBD_OPT_GO."""
    raw = name.encode()
    return (_U32.pack(len(raw)) + raw + _U16.pack(len(infos))
            + b"".join(_U16.pack(i) for i in infos))


def decode_info_request(data: bytes | bytearray | memoryview) -> tuple[str, list[int]]:
    """(export name, info types requested) of NBD_OPT_INFO / NBD_OPT_GO data."""
    _need(data, 4, "info request")
    (n,) = _U32.unpack_from(data)
    _need(data, 4 + n + 2, "info request")
    name = bytes(data[4 : 4 + n]).decode(errors="replace")
    (count,) = _U16.unpack_from(data, 4 + n)
    if len(data) != 4 + n + 2 + 2 * count:
        raise NbdProtocolError("info request: length does not match its counts")
    infos = [int(_U16.unpack_from(data, 6 + n + 2 * i)[0]) for i in range(count)]
    return name, infos


def encode_info_export(size: int, flags: int) -> bytes:
    return _INFO_EXPORT.pack(Info.EXPORT, size, flags)


def encode_info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return _INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, minimum, preferred, maximum)


def decode_info(data: bytes | bytearray | memoryview) -> tuple[int, tuple[int, ...]]:
    """(info type, values): EXPORT -> (size, flags), BLOCK_SIZE -> (min, preferred, max),
    any other type -> ()."""
    _need(data, 2, "info reply")
    (kind,) = _U16.unpack_from(data)
    if kind == Info.EXPORT:
        _need(data, _INFO_EXPORT.size, "NBD_INFO_EXPORT")
        return kind, _INFO_EXPORT.unpack_from(data)[1:]
    if kind == Info.BLOCK_SIZE:
        _need(data, _INFO_BLOCK_SIZE.size, "NBD_INFO_BLOCK_SIZE")
        return kind, _INFO_BLOCK_SIZE.unpack_from(data)[1:]
    return kind, ()


def encode_server_entry(name: str) -> bytes:
    """The data of one NBD_REP_SERVER reply to NBD_OPT_LIST."""
    raw = name.encode()
    return _U32.pack(len(raw)) + raw


def decode_server_entry(data: bytes | bytearray | memoryview) -> str:
    _need(data, 4, "server entry")
    (n,) = _U32.unpack_from(data)
    _need(data, 4 + n, "server entry")
    return bytes(data[4 : 4 + n]).decode(errors="replace")


def encode_export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    pad = b"" if no_zeroes else bytes(EXPORT_NAME_PADDING)
    return _EXPORT_NAME_REPLY.pack(size, flags) + pad


def decode_export_name_reply(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(size, transmission flags) of the reply to NBD_OPT_EXPORT_NAME (padding not included)."""
    _need(data, EXPORT_NAME_REPLY_SIZE, "export name reply")
    size, flags = _EXPORT_NAME_REPLY.unpack_from(data)
    return int(size), int(flags)


# -- transmission ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    type: int
    handle: int
    offset: int
    length: int
    flags: int = 0


def encode_request(req: Request) -> bytes:
    return _REQUEST.pack(REQUEST_MAGIC, req.flags, req.type, req.handle, req.offset, req.length)


def decode_request(data: bytes | bytearray | memoryview) -> Request:
    _need(data, REQUEST_SIZE, "request")
    magic, flags, kind, handle, offset, length = _REQUEST.unpack_from(data)
    if magic != REQUEST_MAGIC:
        raise NbdProtocolError(f"bad request magic {magic:#x}")
    return Request(kind, handle, offset, length, flags)


def encode_simple_reply(handle: int, error: int = 0) -> bytes:
    return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)


def decode_simple_reply(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(handle, error) of a simple reply; a structured reply is a protocol error here
    (dmuser never negotiates them)."""
    _need(data, SIMPLE_REPLY_SIZE, "reply")
    magic, error, handle = _SIMPLE_REPLY.unpack_from(data)
    if magic != SIMPLE_REPLY_MAGIC:
        raise NbdProtocolError(f"bad reply magic {magic:#x}")
    return int(handle), int(error)


def encode_chunk_header(handle: int, kind: int, length: int,
                        flags: int = ReplyFlag.DONE) -> bytes:
    """The header of one structured reply chunk with ``length`` bytes of payload."""
    return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, kind, handle, length)


def encode_data_chunk_header(handle: int, offset: int, length: int) -> bytes:
    """Header and offset of a final ``OFFSET_DATA`` chunk; ``length`` bytes of data follow."""
    return encode_chunk_header(handle, ReplyType.OFFSET_DATA, 8 + length) + _U64.pack(offset)


def encode_error_chunk(handle: int, error: int, message: str = "") -> bytes:
    raw = message.encode()[:4096]
    return (encode_chunk_header(handle, ReplyType.ERROR, _ERROR.size + len(raw))
            + _ERROR.pack(error, len(raw)) + raw)


def decode_chunk_header(data: bytes | bytearray | memoryview) -> tuple[int, int, int, int]:
    """(flags, type, handle, length) of a structured reply chunk."""
    _need(data, CHUNK_HEADER_SIZE, "structured reply")
    magic, flags, kind, handle, length = _CHUNK.unpack_from(data)
    if magic != STRUCTURED_REPLY_MAGIC:
        raise NbdProtocolError(f"bad structured reply magic {magic:#x}")
    return int(flags), int(kind), int(handle), int(length)


def decode_error_payload(data: bytes | bytearray | memoryview) -> tuple[int, str]:
    """(error, message) of an ``ERROR`` chunk."""
    _need(data, _ERROR.size, "error chunk")
    error, n = _ERROR.unpack_from(data)
    _need(data, _ERROR.size + n, "error chunk")
    return int(error), bytes(data[_ERROR.size:_ERROR.size + n]).decode(errors="replace")
