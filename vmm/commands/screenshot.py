"""The guest's framebuffer as a PNG file (``--screenshot``)."""

from __future__ import annotations

from ..errors import UsageError
from ..inspector.physical import write_framebuffer_png
from ..layout import FB_HEIGHT, FB_STRIDE, FB_WIDTH, framebuffer_phys


def save_screenshot(physmem, ram_size: int, path: str) -> None:
    try:
        write_framebuffer_png(physmem, framebuffer_phys(ram_size), FB_WIDTH, FB_HEIGHT, FB_STRIDE, path)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None
