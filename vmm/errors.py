"""The two kinds of error the command line turns into an exit code.

Every error the VMM raises on purpose derives from one of these, so the CLI
maps them to an exit code without importing the module that raised them
(``mm``'s errors are the library's own and are mapped beside these).
"""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input or options: one line naming the problem, exit code 2."""


class HostError(Exception):
    """The host cannot do it (no /dev/kvm, no Rust toolchain, ...): exit code 70."""
