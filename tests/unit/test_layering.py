"""The layers point one way: formats, core <- services <- targets <- daemon, CLI.

Read from the source files' import statements (``ast``), never by importing,
so a wrong-direction import fails here even when nothing executes it.  The
rules (``docs/architecture.md``):

* ``dmuser.formats`` (on-disk formats) imports nothing of dmuser: pure encode/decode.
* ``dmuser.core`` imports only the core, and the formats: a pure leaf of byte
  codecs, which the NBD client device (``core/nbd_device.py``, a BlockDevice
  the resolver makes) needs for the wire format.
* ``dmuser.services`` (dm-io, kcopyd) imports the core and the services.
* ``dmuser.targets`` imports the core, the services, the formats and targets;
  one family never imports another (``snapshot`` and ``mirror`` stand alone),
  and nothing in a family reaches into another module's private names.
* Of the front modules (daemon, CLI, control, FUSE, tools), only
  ``dmuser.daemon`` imports the targets: it lists them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: source folder -> package name (targets/ is installed as dmuser.targets)
ROOTS = {REPO / "dmuser": "dmuser", REPO / "targets": "dmuser.targets"}

ALLOWED = {
    "dmuser.formats": {"dmuser.formats"},
    "dmuser.core": {"dmuser.core", "dmuser.formats"},
    "dmuser.services": {"dmuser.core", "dmuser.services"},
    "dmuser.targets": {"dmuser.core", "dmuser.services", "dmuser.formats", "dmuser.targets"},
}
FAMILIES = ("dmuser.targets.snapshot", "dmuser.targets.mirror")
#: the one front module that knows the list of targets
TARGET_LISTER = "dmuser.daemon"


Roots = dict[Path, str]


def module_name(path: Path, roots: Roots = ROOTS) -> str:
    for root, package in roots.items():
        if path.is_relative_to(root):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            return ".".join([package, *parts])
    raise ValueError(path)


def source_files(roots: Roots = ROOTS) -> list[Path]:
    return sorted(p for root in roots for p in root.rglob("*.py"))


def imports_of(path: Path, roots: Roots = ROOTS) -> list[tuple[int, str]]:
    """(line, absolute module) for every dmuser import in ``path``, nested ones included."""
    name = module_name(path, roots)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.append((node.lineno, mod))
            # "from dmuser.targets import mirror" imports the module dmuser.targets.mirror
            found += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
    return [(line, mod) for line, mod in found
            if mod == "dmuser" or mod.startswith("dmuser.") or mod.split(".")[0] == "targets"]


def layer_of(module: str) -> str | None:
    return next((layer for layer in ALLOWED if module == layer
                 or module.startswith(layer + ".")), None)


def within(module: str, prefixes: set[str] | tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def violations(roots: Roots = ROOTS) -> list[str]:
    """One line per import statement that breaks a rule."""
    found = []
    for path in source_files(roots):
        name = module_name(path, roots)
        layer = layer_of(name)
        family = next((f for f in FAMILIES if within(name, (f,))), None)
        reported: set[int] = set()
        for line, mod in imports_of(path, roots):
            if line in reported:
                continue
            before = len(found)
            where = f"{path}:{line}: {name} imports {mod}"
            if mod.split(".")[0] == "targets":
                found.append(f"{where} (the targets are imported as dmuser.targets)")
            elif mod == "dmuser":
                continue  # the package itself (its __init__ imports nothing)
            elif layer is not None and not within(mod, ALLOWED[layer]):
                found.append(f"{where} (the {layer} layer may import only "
                             f"{', '.join(sorted(ALLOWED[layer]))})")
            elif family is not None and within(mod, FAMILIES) and not within(mod, (family,)):
                found.append(f"{where} (one target family never imports another)")
            elif layer is None and within(mod, ("dmuser.targets",)) and name != TARGET_LISTER:
                found.append(f"{where} (only {TARGET_LISTER} knows the targets)")
            if len(found) > before:
                reported.add(line)
    return found


def test_every_import_points_down_the_layers() -> None:
    assert violations() == []


def test_the_checker_sees_the_tree() -> None:
    """The rules above can fail: the tree has files in every layer, and a
    wrong-direction import is reported."""
    layers = {layer_of(module_name(p)) for p in source_files()}
    assert set(ALLOWED) <= layers and None in layers
    names = {module_name(p) for p in source_files()}
    assert {"dmuser.core.table", "dmuser.services.kcopyd", "dmuser.formats.cow",
            "dmuser.targets.snapshot.snapshot", "dmuser.targets.mirror.target",
            "dmuser.daemon"} <= names


def test_the_oracles_import_nothing_of_dmuser() -> None:
    """``tests/support/oracles.py`` reads the on-disk formats to check dmuser's code: it may
    not share any of it (dmuser.formats, the stores, the logs), so it imports no dmuser."""
    support = REPO / "tests" / "support"
    assert imports_of(support / "oracles.py", {support: "support"}) == []


@pytest.mark.parametrize("module,text,expected", [
    ("dmuser/core/table.py", "from dmuser.services.kcopyd import KcopydClient\n",
     "the dmuser.core layer may import only"),
    ("dmuser/formats/cow.py", "from dmuser.core.units import SECTOR_SHIFT\n",
     "the dmuser.formats layer may import only"),
    ("targets/mirror/legs.py", "from dmuser.targets.snapshot import snap\n",
     "one target family never imports another"),
    ("dmuser/cow_tool.py", "from dmuser.targets.snapshot.store import persistent\n",
     "only dmuser.daemon knows the targets"),
    ("targets/linear.py", "import targets.zero\n",
     "the targets are imported as dmuser.targets"),
])
def test_a_wrong_import_is_reported(tmp_path: Path, module: str, text: str,
                                    expected: str) -> None:
    """Plant one bad import in a copy of a real module and check the report."""
    fake = tmp_path / module
    fake.parent.mkdir(parents=True)
    fake.write_text((REPO / module).read_text() + "\n" + text)
    found = violations({tmp_path / "dmuser": "dmuser", tmp_path / "targets": "dmuser.targets"})
    assert len(found) == 1 and expected in found[0], found
