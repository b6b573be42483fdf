"""`vmm pt --png`: a titled picture with a legend, a sensible size at any RAM size."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from vmm.inspector.physical import OWNERS, PhysicalView
from vmm.inspector.picture import cell_owners, layout, render

PIL = pytest.importorskip("PIL")


def _view(frames: int) -> PhysicalView:
    owner = np.zeros(frames, dtype=np.uint8)
    owner[256:400] = 2  # kernel image
    owner[frames // 2] = 3  # one page table in the middle of free RAM
    return PhysicalView(frames, np.zeros(frames, bool), np.ones(frames, bool), owner)


@pytest.mark.parametrize("ram", [16 << 20, 128 << 20, 16 << 30, 64 << 30])
def test_size_is_sensible_at_any_ram(ram):
    img = render(_view(ram // 4096))
    w, h = img.size
    assert 600 <= w <= 1000 and 200 <= h <= 700, img.size


def test_legend_shows_every_owner_colour():
    img = np.asarray(render(_view(32768)))
    colours = {tuple(c) for c in img.reshape(-1, 3)}
    for name, colour in OWNERS.values():
        assert tuple(colour) in colours, f"legend lacks {name}"


def test_a_lone_page_table_survives_downsampling():
    frames = 16 << 18  # 16 GiB
    per_cell, _cols, _rows, _px = layout(frames)
    assert per_cell == 16
    cells = cell_owners(_view(frames).owner, per_cell)
    assert cells[(frames // 2) // per_cell] == 3
    assert np.count_nonzero(cells == 3) == 1


@pytest.mark.kvm
def test_pt_png_says_where_it_wrote(guest_kernel_path, tmp_path):
    out = tmp_path / "phys.png"
    proc = subprocess.run([sys.executable, "vmm.py", "pt", "--kernel", str(guest_kernel_path), "--png", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"vmm: wrote {out} (" in proc.stderr
    from PIL import Image

    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] <= 1000
