#!/usr/bin/env python3
"""Long fuzz runs of every parser that reads untrusted bytes.

The test suite runs short property-based fuzz tests (hypothesis); this script
runs the same targets for as long as you like with a mutational fuzzer seeded
from valid inputs: the ELF loader, the memory-map parser, the guest-report
decoder, the page-table walker, the heap free-list walker and the snapshot
loader. Any exception
other than the target's own one-line error type is a bug: it is printed with
the input (hex) and the script exits 1.

    python3 scripts/fuzz.py [--seconds 60] [--target elf|memmap|report|walker|heap|snapshot|all] [--seed N]
"""

from __future__ import annotations

import argparse
import random
import struct
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from mm import BufferMemory, BumpFrameAllocator, Mapper, PageSize, PteFlags  # noqa: E402
from mm.errors import MemoryMapError  # noqa: E402
from mm.memmap import MemoryMap  # noqa: E402
from mm.walker import RunArrays, walk_arrays  # noqa: E402
from tests.elfgen import simple_kernel  # noqa: E402
from tests.snapgen import load_bytes, snapshot_bytes  # noqa: E402
from vmm.abi import ReportKind  # noqa: E402
from vmm.boot_plan import build_memory_map  # noqa: E402
from vmm.elf import KernelImageError, parse_kernel  # noqa: E402
from vmm.inspector.heap import RunTranslator, walk_free_list  # noqa: E402
from vmm.reports import ReportError, decode_report, encode_report  # noqa: E402
from vmm.snapshot.elfcore import CoreFormatError  # noqa: E402


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.random()
        if op < 0.5 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op < 0.65 and b:
            pos = rng.randrange(len(b))
            b[pos : pos + 8] = struct.pack("<Q", rng.choice([0, 1, 0xFFFF_FFFF_FFFF_FFFF, 1 << 63, rng.getrandbits(64)]))[
                : len(b) - pos
            ]
        elif op < 0.8:
            del b[rng.randrange(len(b) + 1) :]
        elif op < 0.9:
            b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        elif b:
            i, j = sorted(rng.randrange(len(b)) for _ in range(2))
            b[i:j] = b[i:j][::-1]
    return bytes(b)


def target_elf(rng, seeds):
    data = mutate(rng, rng.choice(seeds["elf"]))
    try:
        parse_kernel(data)
    except KernelImageError:
        pass
    return data


def target_memmap(rng, seeds):
    data = mutate(rng, rng.choice(seeds["memmap"]))
    try:
        MemoryMap.parse(data, ram_size=rng.choice([None, 64 << 20]))
    except MemoryMapError:
        pass
    return data


def target_report(rng, seeds):
    data = mutate(rng, rng.choice(seeds["report"]))
    try:
        decode_report(data)
    except ReportError:
        pass
    return data


def target_snapshot(rng, seeds):
    """The snapshot loader (ELF core + notes + metadata); accepted files must
    describe only segments inside RAM and inside the file."""
    data = mutate(rng, rng.choice(seeds["snapshot"]))
    try:
        core, state = load_bytes(data)
    except CoreFormatError:
        return data
    for ld in core.loads:
        assert ld.end <= state.memory_size and ld.offset + ld.size <= core.file_size, "accepted an out-of-bounds segment"
    return data


def target_walker(rng, seeds):
    """Random garbage over a valid tree: the walker must end, in bounds."""
    mem = BufferMemory(bytearray(seeds["pt"]))
    for _ in range(rng.randint(1, 32)):
        off = rng.randrange(0, len(seeds["pt"]) // 8) * 8
        mem.write_u64(off, rng.choice([rng.getrandbits(64), (rng.getrandbits(40) << 12) | 0x83, 0x1003, 0]))
    walk_arrays(mem, 0x1000, max_tables=2048)
    return b""


def target_heap(rng, seeds):
    heap, size = 0xFFFF_C000_0000_0000, 1 << 14
    buf = bytearray(size)
    for off in range(0, size, 16):
        if rng.random() < 0.2:
            struct.pack_into("<QQ", buf, off, rng.choice([16, 32, rng.getrandbits(16), rng.getrandbits(64)]),
                             heap + rng.randrange(size // 16) * 16 if rng.random() < 0.9 else rng.getrandbits(64))
    mem = BufferMemory(buf)
    runs = RunArrays(*(np.array([v], dtype=np.uint64) for v in (heap, 0, size, 3, 4096, 1)))
    walk_free_list(mem, RunTranslator(runs), heap + rng.randrange(size // 16) * 16, heap, heap + size, max_nodes=4096)
    return bytes(buf[:64])


TARGETS = {"elf": target_elf, "memmap": target_memmap, "report": target_report, "walker": target_walker,
           "heap": target_heap, "snapshot": target_snapshot}


def seeds() -> dict:
    mem = BufferMemory(bytearray(1 << 20))
    m = Mapper.new(mem, BumpFrameAllocator(0x1000, 0x40000))
    m.map_range(0xFFFF_8000_0000_0000, 0, 16 << 20, PteFlags.PRESENT | PteFlags.WRITABLE | PteFlags.NO_EXECUTE, PageSize.SIZE_2M)
    m.map_range(0xFFFF_FFFF_8000_0000, 0x100000, 0x20000, PteFlags.PRESENT, PageSize.SIZE_4K)
    assert m.root == 0x1000
    return {
        "elf": [simple_kernel().build()],
        "memmap": [build_memory_map(64 << 20, None).to_bytes()],
        "report": [encode_report(ReportKind.INFO, {"kaslr_slide": "0x200000", "rdrand": 1}),
                   encode_report(ReportKind.TEST_RESULT, {"name": "heap::x", "status": "pass", "msg": ""})],
        "pt": mem.read(0, 0x40000),
        "snapshot": [snapshot_bytes(runs=[(0x1000, 0x1000), (0x5000, 0x2000)])],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0, help="per target (default 60)")
    ap.add_argument("--target", default="all", choices=["all", *TARGETS])
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    rng = random.Random(seed)
    corpus = seeds()
    names = list(TARGETS) if args.target == "all" else [args.target]
    print(f"fuzz seed {seed}; {args.seconds:g} s per target")
    for name in names:
        fn, n, t0 = TARGETS[name], 0, time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            try:
                fn(rng, corpus)
            except Exception:
                print(f"{name}: BUG after {n} inputs (seed {seed}):")
                traceback.print_exc()
                return 1
            n += 1
        print(f"{name:8s} {n:9d} inputs, {n / args.seconds:8.0f}/s, no unexpected exception")
    return 0


if __name__ == "__main__":
    sys.exit(main())
