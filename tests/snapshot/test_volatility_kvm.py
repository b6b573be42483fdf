"""A reader no one here wrote: Volatility 3's ELF layer over a snapshot,
with its Intel32e layer on the saved CR3, sees the same mappings as
`vmm pt --snapshot FILE`.

Volatility maps a PT_LOAD by p_paddr only when p_filesz == p_memsz, and
counts a page as mapped only if its whole physical page (2 MiB for a large
leaf) lies inside a segment. With `--save-layout sparse` all of RAM is one
segment (zero pages are file holes), so the two must agree page for page.
With the default compact layout (only non-zero pages stored) they must agree
on every mapping whose physical page is in the file, and Volatility must
see nothing else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.kvm

volatility3 = pytest.importorskip("volatility3", reason="volatility3 is a test dependency (pip install -e '.[test]')")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAGE = 4096
VA_MASK = (1 << 48) - 1  # Volatility's Intel32e addresses: 0 .. 2^48, no sign extension


def vmm(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "vmm.py"), *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def volatility_pages(path, cr3: int) -> set[tuple[int, int]]:
    from volatility3.framework import contexts
    from volatility3.framework.layers import elf, intel, physical

    ctx = contexts.Context()
    ctx.config["file.location"] = "file://" + str(path)
    ctx.layers.add_layer(physical.FileLayer(ctx, "file", "file"))
    ctx.config["elf.base_layer"] = "file"
    ctx.layers.add_layer(elf.Elf64Layer(ctx, "elf", "elf"))
    ctx.config["virt.memory_layer"] = "elf"
    ctx.config["virt.page_map_offset"] = cr3
    layer = intel.Intel32e(ctx, "virt", "virt")
    ctx.layers.add_layer(layer)
    pages = set()
    for virt, size, phys, _msize, layer_name in layer.mapping(0, 1 << 48, ignore_errors=True):
        assert layer_name == "elf"
        pages.update((virt + i, phys + i) for i in range(0, size, PAGE))
    return pages


def vmm_pages(path) -> tuple[int, list[dict]]:
    proc = vmm("pt", "--snapshot", str(path), "--json", "--all")
    assert proc.returncode == 0, proc.stderr
    view = json.loads(proc.stdout)
    return view["registers"]["cr3"], view["runs"]


def stored_ranges(path) -> list[tuple[int, int]]:
    from vmm.snapshot.machine import open_snapshot

    with open_snapshot(str(path)) as snap:
        return [(ld.paddr, ld.end) for ld in snap.core.loads]


def _inside(ranges, lo, hi) -> bool:
    return any(a <= lo and hi <= b for a, b in ranges)


@pytest.mark.parametrize("layout", ["sparse", "compact"])
@pytest.mark.parametrize("cmdline", ["", "workload=mm workload_iters=30 rng=seed"])
def test_volatility_sees_what_vmm_pt_sees(tmp_path, vmm_kernel_path, layout, cmdline):
    path = tmp_path / "g.core"
    save = vmm("run", "--kernel", str(vmm_kernel_path), "-q", "-c", cmdline, "--save", str(path),
               "--save-at", "exit" if cmdline else "ready", "--save-layout", layout)
    assert save.returncode == 0, save.stderr
    cr3, runs = vmm_pages(path)
    stored = stored_ranges(path)
    want = set()
    for r in runs:
        # Runs are cut where the owner changes, so one may start inside a 2 MiB leaf.
        for off in range(0, r["size"], PAGE):
            phys = r["phys"] + off
            leaf = phys & ~(r["page_size"] - 1)
            # Volatility needs the leaf's whole physical page inside a segment.
            if _inside(stored, leaf, leaf + r["page_size"]):
                want.add(((r["virt"] + off) & VA_MASK, phys))
    got = volatility_pages(path, cr3)
    assert got == want
    if layout == "sparse":
        # Every mapping vmm pt lists is visible to Volatility: nothing was filtered.
        assert len(want) == sum(r["size"] for r in runs) // PAGE
        assert os.stat(path).st_blocks * 512 < 8 << 20  # zero pages are holes on disk
    else:
        assert want  # kernel text, page tables' targets, heap: the non-zero parts are there
        assert any(r["label"].startswith("kernel .text") for r in runs)
