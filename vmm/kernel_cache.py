"""What depends only on a kernel file, cached next to it: ``<kernel>.cache``.

Two things are worth keeping between processes (measured on the guest
kernel, KVM-PVM host): its symbols (pyelftools' import plus reading .symtab
costs about 70 ms) and the boot plans (memory map and slide-0 page tables per
RAM size, built with the mapper: importing numpy costs about 50 ms). The ELF
header, segments and relocations are not cached: parsing them takes 0.3 ms,
no more than reading them back.

The file is keyed by the kernel's SHA-256: the one the build stamp recorded
when the file is unchanged since (``guest_build.built_kernel_sha256``: a
stat), else computed (the kernel carries debug info: 4 MB, about 2 ms with
OpenSSL). It is only ever a cache: a missing, stale, truncated or corrupt file (the first
line carries a CRC-32 of the rest) is ignored and rewritten; a directory that
cannot be written leaves everything working, just uncached. Writes are atomic
(rename), so concurrent processes see an old file or a new one.

Format: line 1 is a JSON header ``{"format", "kernel_sha256", "crc32"}``,
the rest one JSON object ``{"symbols": [[name, addr, size]...], "boot":
{"<ram>:<0|1>": plan}}``.
"""

from __future__ import annotations

import base64
import json
import os
import zlib
from pathlib import Path

try:  # the same SHA-256 without importing OpenSSL through hashlib (2.5 ms)
    from _sha256 import sha256
except ImportError:  # pragma: no cover - a Python built without it
    from hashlib import sha256

from .boot import BootPlan, TablesTemplate
from .layout import PT_POOL_START
from .elf import KernelImage, Symbol, load_kernel_file, read_symbols

FORMAT = 3  # 3: TablesTemplate holds its chain of tables as data (base, size, index_bits, tables)
SUFFIX = ".cache"


def cache_path(kernel: str | Path) -> Path:
    kernel = Path(kernel)
    return kernel.with_name(kernel.name + SUFFIX)


class KernelCache:
    """The cache of one kernel file's contents (``data``)."""

    def __init__(self, path: Path, digest: str):
        self.path = path
        self.digest = digest
        self.payload: dict = {}
        self.loaded = False  # the file was there and valid

    @classmethod
    def open(cls, kernel: str | Path, data: bytes, digest: str | None = None) -> "KernelCache":
        """``digest``: the SHA-256 of ``data`` if already known (else computed)."""
        if digest is None:
            digest = sha256(data).hexdigest()
        cache = cls(cache_path(kernel), digest)
        cache.payload = cache._read()
        cache.loaded = bool(cache.payload)
        return cache

    def _read(self) -> dict:
        try:
            raw = self.path.read_bytes()
            head, _, body = raw.partition(b"\n")
            header = json.loads(head)
            if header.get("format") != FORMAT or header.get("kernel_sha256") != self.digest:
                return {}
            if header.get("crc32") != zlib.crc32(body):
                return {}
            payload = json.loads(body)
            return payload if isinstance(payload, dict) else {}
        except (OSError, ValueError, AttributeError):
            return {}

    def _write(self) -> None:
        body = json.dumps(self.payload, separators=(",", ":")).encode()
        header = json.dumps({"format": FORMAT, "kernel_sha256": self.digest, "crc32": zlib.crc32(body)}).encode()
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(header + b"\n" + body)
            os.replace(tmp, self.path)
        except OSError:  # read-only directory, disk full...: stay uncached
            try:
                tmp.unlink()
            except OSError:
                pass

    # --- symbols ---------------------------------------------------------------------
    def symbols(self, data: bytes) -> list[Symbol]:
        """The kernel's symbols: from the cache, else read from ``data`` and stored."""
        try:
            return [Symbol(str(n), int(a), int(s)) for n, a, s in self.payload["symbols"]]
        except (KeyError, TypeError, ValueError):
            pass
        syms = read_symbols(data)
        self.payload["symbols"] = [[s.name, s.addr, s.size] for s in syms]
        self._write()
        return syms

    # --- boot plans ------------------------------------------------------------------
    @staticmethod
    def _boot_key(ram_size: int, use_1g: bool) -> str:
        return f"{ram_size}:{int(bool(use_1g))}"

    def boot_plan(self, ram_size: int, use_1g: bool, segments: tuple) -> BootPlan | None:
        """The stored plan, or None if absent, made for other segments (``boot.plan_key``'s)
        or not self-consistent (then it is rebuilt)."""
        try:
            entry = self.payload["boot"][self._boot_key(ram_size, use_1g)]
            if [list(s) for s in segments] != entry["segments"]:
                return None  # a plan keyed to this file's digest must also fit its segments
            memmap = base64.b64decode(entry["memmap"], validate=True)
            count = int(entry["memmap_count"])
            if count <= 0 or len(memmap) != count * 40:
                return None
            t = entry["tables"]
            tables = None
            if t is not None:
                pool = zlib.decompress(base64.b64decode(t["pool"], validate=True))
                chain = tuple((int(frame), int(shift)) for frame, shift in t["tables"])
                tables = TablesTemplate(pool, *(int(t[k]) for k in _TEMPLATE_INTS), chain)
                if not _template_fits(tables):
                    return None
            return BootPlan(memmap, count, tables)
        except (KeyError, TypeError, ValueError, AttributeError, zlib.error):
            return None

    def store_boot_plan(self, ram_size: int, use_1g: bool, segments: tuple, plan: BootPlan) -> None:
        t = plan.tables
        entry = {
            "segments": [list(s) for s in segments],
            "memmap": base64.b64encode(plan.memmap).decode(),
            "memmap_count": plan.memmap_count,
            "tables": None if t is None else {
                "pool": base64.b64encode(zlib.compress(t.pool)).decode(),
                **{k: getattr(t, k) for k in _TEMPLATE_INTS},
                "tables": [list(x) for x in t.tables],
            },
        }
        boot = self.payload.get("boot")
        if not isinstance(boot, dict) or len(boot) >= 16:
            boot = self.payload["boot"] = {}
        boot[self._boot_key(ram_size, use_1g)] = entry
        self._write()


_TEMPLATE_INTS = ("root", "end", "base", "size", "index_bits")


def _template_fits(t: TablesTemplate) -> bool:
    """Every frame inside the pool it came with, a table one frame, the chain
    top-down and the kernel's range inside one table of its lowest level: a
    template that passed the CRC but not this is not used (boot would index
    outside the tables)."""
    end = PT_POOL_START + len(t.pool)
    frames = (t.root, *(f for f, _ in t.tables))
    frames_ok = all(PT_POOL_START <= f < end and f % 4096 == 0 for f in frames)
    shifts = [s for _, s in t.tables]
    if not (frames_ok and shifts and len(t.pool) % 4096 == 0 and t.end == end and 8 << t.index_bits == 4096):
        return False
    low = shifts[-1]
    return (all(a == b + t.index_bits for a, b in zip(shifts, shifts[1:])) and low > 0
            and t.size > 0 and t.base % (1 << low) == 0 and t.size % (1 << low) == 0
            and t.base >> (low + t.index_bits) == (t.base + t.size - 1) >> (low + t.index_bits))


def load_cached_kernel(path: str | Path, digest: str | None = None) -> KernelImage:
    """``load_kernel_file`` with the kernel file's cache attached: symbols and
    boot plans come from ``<path>.cache`` when it matches, and are stored there
    the first time they are needed. ``digest``: the file's SHA-256 if known."""
    image = load_kernel_file(path)
    cache = KernelCache.open(path, image.data, digest)
    image.cache = cache
    image.symbol_loader = lambda: cache.symbols(image.data)
    return image
