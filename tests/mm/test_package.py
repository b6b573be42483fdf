"""The mm package loads its names on first use: the memory-map model without numpy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import mm

REPO = Path(__file__).resolve().parents[2]


def test_every_public_name_resolves_to_its_submodule():
    for name in mm.__all__:
        value = getattr(mm, name)
        assert value is getattr(sys.modules[f"mm.{mm._EXPORTS[name]}"], name)
    assert set(mm.__all__) <= set(dir(mm))


def test_submodules_are_attributes_too():
    assert mm.walker.walk is mm.walk and mm.memmap.MemoryMap is mm.MemoryMap


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError):
        mm.no_such_name  # noqa: B018


def test_the_memory_map_model_imports_no_numpy():
    code = ("import sys; from mm.memmap import MemoryMap; from mm import PteFlags, PAGE_4K; "
            "MemoryMap.from_ram(64 << 20).validate(); print('numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
