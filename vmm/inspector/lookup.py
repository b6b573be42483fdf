"""One address at a time, as text, for gdb's ``monitor translate`` / ``monitor xp``.

Thin front of ``vmm.inspector.queries`` (the walk and the dumps are computed
there once, for ``vmm translate/xp`` and the gdb stub alike), so both print
the same thing.
"""

from __future__ import annotations

from .queries import MAX_DUMP, Dump, translate

__all__ = ["translate_text", "hexdump", "MAX_DUMP"]


def translate_text(physmem, cr3: int, virt: int, *, nxe: bool = True) -> str:
    """The walk of ``virt`` from ``cr3``, level by level (``queries.Walk.text``)."""
    return translate(physmem, cr3, virt, nxe=nxe).text()


def hexdump(data: bytes, base: int) -> str:
    """16 bytes a line: address, hex, ASCII (``queries.Dump.text``)."""
    return Dump(base, False, bytes(data)).text()
