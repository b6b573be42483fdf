"""Readable symbol names: binutils' ``c++filt``, one process per batch.

The guest's symbols are Rust, mangled either in the legacy scheme
(``_ZN...17h<hash>E``) or in v0 (``_R...``, RFC 2603). A hand-written
demangler got half of v0 wrong (impl paths, generics, closures), so we use
a maintained one: GNU c++filt (binutils, installed by setup.sh) understands
both Rust schemes and C++. All names go through one c++filt process (about
2 ms for the guest's ~270 symbols); callers demangle lazily, only when a
name is shown (a fault report, a backtrace), never on the boot path.

c++filt keeps the v0 crate disambiguators (``kernel[ad6932332051b9bb]::``),
and the legacy ``::h<hash>`` suffix, which say nothing to a reader of a
one-kernel report; both are dropped, as rustc-demangle's alternate form does.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence

# v0 crate disambiguator as c++filt prints it: crate[16 hex digits]
_CRATE_HASH = re.compile(r"\[[0-9a-f]{1,16}\]")
# legacy-scheme hash suffix, which c++filt keeps (it demangles verbosely)
_LEGACY_HASH = re.compile(r"::h[0-9a-f]{16}$")
_MANGLED_PREFIXES = ("_R", "_ZN", "_Z")


def is_mangled(name: str) -> bool:
    return name.startswith(_MANGLED_PREFIXES)


def cxxfilt_path() -> str | None:
    return shutil.which("c++filt")


def demangle_all(names: Sequence[str]) -> list[str]:
    """Demangled form of every name (unchanged where not mangled or no c++filt).

    One c++filt process for the whole batch: names go one per line on stdin
    and come back one per line, in order.
    """
    out = list(names)
    todo = [i for i, n in enumerate(names) if is_mangled(n) and "\n" not in n]
    if not todo:
        return out
    exe = cxxfilt_path()
    if exe is None:
        return out
    try:
        proc = subprocess.run(
            [exe], input="".join(names[i] + "\n" for i in todo), capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return out
    lines = proc.stdout.split("\n")
    if proc.returncode != 0 or len(lines) < len(todo):
        return out
    for i, text in zip(todo, lines):
        out[i] = _LEGACY_HASH.sub("", _CRATE_HASH.sub("", text)) if text else names[i]
    return out


def demangle(name: str) -> str:
    return demangle_all([name])[0]
