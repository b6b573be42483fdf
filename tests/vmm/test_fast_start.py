"""The fast start path: what a plain boot does not pay for."""

from __future__ import annotations

from vmm.elf import load_kernel_file


def test_symbols_are_read_on_first_use(guest_kernel_path):
    image = load_kernel_file(guest_kernel_path)
    assert not image.symbols_loaded
    sym = image.symbolizer(0x200000)
    assert not image.symbols_loaded  # a symbolizer alone reads nothing
    name = sym.lookup(image.entry + 0x200000)
    assert image.symbols_loaded and name and not name.startswith("0x")
    assert any(s.addr == image.entry for s in image.symbols)
