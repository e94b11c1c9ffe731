"""dmsetup's command line, parsed as its ``getopt_long`` parses it.

Options may come anywhere (GNU permutation: ``dmsetup remove NAME --deferred``),
``--`` ends them, short ones cluster (``-cf``) and take their argument attached
or as the next word (``-ofoo``, ``-o foo``), long ones take ``--opt=value`` or
the next word and may be abbreviated to a unique prefix.  Every option dmsetup
1.02.185 knows is accepted (the long list of its ``_process_switches``); the
commands act on the ones dmuser can honour.  A bad option is a
:class:`UsageError` whose text is getopt's, e.g.
``dmsetup: unrecognized option '--bogus'``; dmsetup then adds
``Couldn't process command line.`` and exits 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: short option -> long name (dmsetup's "cCfG:hj:m:M:no:O:rS:u:U:vy")
SHORT = {"c": "columns", "C": "columns", "f": "force", "G": "gid", "h": "help", "j": "major",
         "m": "minor", "M": "mode", "n": "notable", "o": "options", "O": "sort",
         "r": "readonly", "S": "select", "u": "uuid", "U": "uid", "v": "verbose", "y": "yes"}

def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


#: long options taking an argument
WITH_ARG = _names("""alias areas areasize bounds count exec follow gid groupid headings
    interval length major manglename minor mode options programid readahead regionid regions
    select separator sort start table target udevcookie uid units userdata uuid""")

#: long options without one (``verbose``: a flag here, as dmsetup's usage documents it)
FLAGS = _names("""addnodeoncreate addnodeonresume alldevices allprograms allregions area
    checks clear columns concise deferred filemap force foreground group help histogram
    inactive nameprefixes noflush nogroup noheadings nolockfs nomonitor noopencount nosuffix
    notable notimesuffix noudevrules noudevsync precise raw readonly region relative retry
    rows segments setuuid showkeys tree unbuffered unquoted verbose verifyudev version
    yes""")

LONG = WITH_ARG | FLAGS

#: command -> (min, max) arguments after it (-1: no limit), from dmsetup's command table
COMMANDS: dict[str, tuple[int, int]] = {
    "help": (0, 0), "create": (0, 2), "remove": (0, -1), "remove_all": (0, 0),
    "suspend": (0, -1), "resume": (0, -1), "load": (0, 2), "clear": (0, -1),
    "reload": (0, 2), "wipe_table": (0, -1), "rename": (1, 2), "measure": (0, -1),
    "message": (2, -1), "ls": (0, 0), "info": (0, -1), "deps": (0, -1), "stats": (1, -1),
    "status": (0, -1), "table": (0, -1), "wait": (0, 2), "mknodes": (0, -1),
    "mangle": (0, -1), "udevcreatecookie": (0, 0), "udevreleasecookie": (0, 1),
    "udevflags": (1, 1), "udevcomplete": (1, 1), "udevcomplete_all": (0, 1),
    "udevcookies": (0, 0), "target-version": (1, -1), "targets": (0, 0), "version": (0, 0),
    "setgeometry": (5, 5), "splitname": (1, 2),
}


class UsageError(Exception):
    """A command line getopt refuses; ``str()`` is getopt's message."""


@dataclass
class Options:
    """The parsed command line: switches counted, arguments (last one wins), operands."""

    switches: dict[str, int] = field(default_factory=dict)
    values: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)

    def has(self, name: str) -> bool:
        return self.switches.get(name, 0) > 0

    def get(self, name: str) -> str | None:
        return self.values.get(name)

    @property
    def command(self) -> str | None:
        return self.args[0] if self.args else None

    @property
    def operands(self) -> list[str]:
        return self.args[1:]


def _long(word: str) -> str:
    """The long option ``word`` (without ``--``) names: exact, else a unique prefix."""
    if word in LONG:
        return word
    matches = sorted(name for name in LONG if name.startswith(word))
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise UsageError(f"dmsetup: unrecognized option '--{word}'")
    raise UsageError(f"dmsetup: option '--{word}' is ambiguous; possibilities: "
                     + " ".join(f"'--{m}'" for m in matches))


def parse(argv: list[str]) -> Options:
    """Parse dmsetup's arguments (``argv`` without the program name)."""
    opts = Options()
    i = 0

    def take(name: str, attached: str | None, shown: str) -> None:
        nonlocal i
        opts.switches[name] = opts.switches.get(name, 0) + 1
        if name not in WITH_ARG:
            return
        if attached is None:
            if i + 1 >= len(argv):
                raise UsageError(shown)
            i += 1
            attached = argv[i]
        opts.values[name] = attached

    while i < len(argv):
        word = argv[i]
        if word == "--":
            opts.args.extend(argv[i + 1:])
            break
        if word.startswith("--"):
            key, eq, value = word[2:].partition("=")
            name = _long(key)
            if eq and name not in WITH_ARG:
                raise UsageError(f"dmsetup: option '--{name}' doesn't allow an argument")
            take(name, value if eq else None,
                 f"dmsetup: option '--{name}' requires an argument")
        elif word.startswith("-") and word != "-":
            for j, ch in enumerate(word[1:], start=1):
                name = SHORT.get(ch, "")
                if not name:
                    raise UsageError(f"dmsetup: invalid option -- '{ch}'")
                if name in WITH_ARG:
                    rest = word[j + 1:]
                    take(name, rest or None, f"dmsetup: option requires an argument -- '{ch}'")
                    break
                take(name, None, "")
        else:
            opts.args.append(word)
        i += 1
    return opts
