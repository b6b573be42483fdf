"""Physical memory as the guest's frame allocator sees it, checked from outside.

The guest reports where its bitmaps live (INSPECT: ``bitmap_phys``,
``bitmap_bits``; layout ``used_then_managed``: a ``used`` bitmap of
ceil(bits/64) u64 words, then a ``managed`` one of the same size; see
guest/src/memory/frames.rs). From a snapshot this module derives:

- used/free frames per memory-map region;
- cross-checks: every frame the page tables reference (tables themselves and
  the frames behind every mapping outside the direct map) must be marked used;
  every allocated frame should be reachable that way (else: a possible leak);
- an owner for every frame (kernel image, page tables, heap, stacks, other
  allocations, free, reserved, framebuffer, loader data), drawn by picture.py.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

from mm.findings import Finding, Severity

from ..layout import PHYS_OFFSET
from .labels import HEAP, Labeler
from .snapshot import Snapshot

PAGE = 4096

OWNERS = {
    0: ("free", (40, 160, 60)),
    1: ("reserved", (90, 90, 90)),
    2: ("kernel image", (60, 110, 230)),
    3: ("page tables", (230, 180, 40)),
    4: ("heap", (200, 70, 200)),
    5: ("stacks", (230, 90, 40)),
    6: ("other allocated", (220, 40, 40)),
    7: ("framebuffer", (40, 200, 220)),
    8: ("loader / boot data", (150, 120, 90)),
    9: ("allocator bitmaps", (255, 255, 255)),
}


@dataclass
class PhysicalView:
    frames: int
    used: np.ndarray  # bool per frame
    managed: np.ndarray  # bool per frame
    owner: np.ndarray  # uint8 per frame, keys of OWNERS
    regions: list[dict] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    leaked_frames: int = 0

    @property
    def allocated(self) -> int:
        return int(np.count_nonzero(self.used & self.managed))

    @property
    def free(self) -> int:
        return int(np.count_nonzero(~self.used & self.managed))

    def owner_counts(self) -> dict[str, int]:
        counts = np.bincount(self.owner, minlength=len(OWNERS))
        return {OWNERS[i][0]: int(counts[i]) for i in range(len(OWNERS))}

    def to_json(self) -> dict:
        return {
            "frames": self.frames,
            "managed": int(np.count_nonzero(self.managed)),
            "allocated": self.allocated,
            "free": self.free,
            "leaked_frames": self.leaked_frames,
            "owners": self.owner_counts(),
            "regions": self.regions,
            "findings": [str(f) for f in self.findings],
        }


def _bits(raw: bytes, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")[:n].astype(bool)


def physical_view(snap: Snapshot, physmem) -> PhysicalView | None:
    facts = snap.facts
    if facts.bitmap is None:
        return None
    bitmap_phys, bits = facts.bitmap
    frames = min(bits, facts.ram_size // PAGE)
    words = -(-bits // 64)
    nbytes = words * 8
    if bitmap_phys < 0 or bitmap_phys + 2 * nbytes > facts.ram_size:
        return PhysicalView(
            frames, np.zeros(frames, bool), np.zeros(frames, bool), np.ones(frames, np.uint8),
            findings=[Finding("bitmap-outside-ram", None, 0, f"bitmap at {bitmap_phys:#x} lies outside RAM", Severity.ERROR)],
        )
    raw = snap.bitmap_raw  # copied while the vCPU was parked
    if raw is None or len(raw) != 2 * nbytes:
        raw = physmem.read(bitmap_phys, 2 * nbytes)
    used, managed = _bits(raw[:nbytes], frames), _bits(raw[nbytes:], frames)
    view = PhysicalView(frames, used, managed, np.zeros(frames, np.uint8))

    # Owners from the memory map first, then the page tables refine allocated frames.
    owner = view.owner
    owner[~managed] = 1
    for d in facts.memmap:
        kind = d.get("type")
        a, b = d["phys_start"] // PAGE, min(frames, d["end"] // PAGE)
        if kind in ("LOADER_CODE",):
            owner[a:b] = 2
        elif kind == "LOADER_DATA":
            owner[a:b] = 8
        elif kind == "FRAMEBUFFER":
            owner[a:b] = 7
    if facts.kernel_phys is not None:
        kernel_lo, kernel_hi = facts.kernel_phys
        owner[kernel_lo // PAGE : min(frames, -(-kernel_hi // PAGE))] = 2
    bm = bitmap_phys // PAGE
    owner[bm : bm + -(-2 * nbytes // PAGE)] = 9

    reachable = np.zeros(frames, bool)
    pt = snap.page_table_frames.astype(np.int64) // PAGE
    pt = pt[(pt >= 0) & (pt < frames)]
    reachable[pt] = True
    labeler = Labeler.for_facts(facts)
    aliases = [(PHYS_OFFSET, PHYS_OFFSET + facts.ram_size)]
    if facts.cpl3_ram_alias is not None:
        aliases.append(facts.cpl3_ram_alias)
    for run in snap.iter_runs():
        if any(lo <= run.virt < hi for lo, hi in aliases):
            continue  # the direct map (and a CPL3 run's alias of it) maps everything: it proves nothing
        for piece, name in labeler.split(run):
            lo, hi = max(0, piece.phys // PAGE), min(frames, -(-(piece.phys + piece.size) // PAGE))
            if lo >= hi:
                continue
            reachable[lo:hi] = True
            kind = 4 if name == HEAP else 5 if name.startswith("stack") else None
            if kind is not None:
                sl = owner[lo:hi]
                sl[managed[lo:hi]] = kind
    owner[pt] = 3
    allocated = used & managed
    free = ~used & managed
    owner[free] = 0
    other = allocated & (owner == 0)
    owner[other] = 6

    bad = reachable & free
    if bad.any():
        idx = np.nonzero(bad)[0]
        view.findings.append(
            Finding(
                "mapped-frame-free", None, int(idx.size) * PAGE,
                f"{idx.size} frame(s) referenced by the page tables are free in the bitmap (first {int(idx[0]) * PAGE:#x})",
                Severity.ERROR,
            )
        )
    leaked = allocated & ~reachable
    view.leaked_frames = int(np.count_nonzero(leaked))
    if view.leaked_frames:
        idx = np.nonzero(leaked)[0]
        view.findings.append(
            Finding(
                "unreachable-allocated", None, view.leaked_frames * PAGE,
                f"{view.leaked_frames} allocated frame(s) not reachable from the page tables "
                f"(possible leak, or in use through the direct map only; first {int(idx[0]) * PAGE:#x})",
                Severity.INFO,
            )
        )
    for d in facts.memmap:
        a, b = d["phys_start"] // PAGE, min(frames, d["end"] // PAGE)
        view.regions.append(
            {
                "type": d.get("type"),
                "phys_start": d["phys_start"],
                "end": d["end"],
                "frames": max(0, b - a),
                "allocated": int(np.count_nonzero(allocated[a:b])),
                "free": int(np.count_nonzero(free[a:b])),
            }
        )
    return view


def _png(path: str, rgb: np.ndarray) -> None:
    """Write an RGB uint8 array as PNG (zlib only, no imaging library)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 6)))
        f.write(chunk(b"IEND", b""))


def write_framebuffer_png(physmem, fb_phys: int, width: int, height: int, stride: int, path: str) -> None:
    """Save a BGRX8888 framebuffer from guest RAM as an RGB PNG."""
    raw = np.frombuffer(physmem.read(fb_phys, stride * height), dtype=np.uint8).reshape(height, stride)
    bgrx = raw[:, : width * 4].reshape(height, width, 4)
    _png(path, np.ascontiguousarray(bgrx[:, :, 2::-1]))
