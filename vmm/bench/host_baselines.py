"""Host baselines, written in C and built with gcc on the fly (in a temp dir).

Two artefacts, both kept here as source text:

- ``kvm_loop.so``: the exit-storm loop of ``exits.py`` in C (``KVM_RUN`` in a
  loop until the exit port is written), called through ctypes on a vCPU the
  Python VMM set up, so both loops run the very same guest;
- ``host_bench``: an executable measuring what the guest's own benchmarks
  compare with: glibc ``malloc``+``free`` of a given size (also with N free
  chunks lying around), a Linux minor page fault (``mmap`` anonymous, first
  touch of each page), ``mmap(MAP_POPULATE)``+``munmap`` of one page, the
  TSC frequency against ``CLOCK_MONOTONIC``, and the KVM setup ioctls of a
  minimal C VMM (the baseline of the boot steps). Each operation is timed on its
  own with ``lfence; rdtsc`` / ``rdtscp; lfence``; the cost of an empty
  measurement is subtracted (medians), and the result printed as one JSON
  line of cycle percentiles.

A separate process gives each measurement a fresh glibc heap, untouched by
Python's allocator. No gcc: every function here raises ``BaselineError``
and the report says so.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

from .stats import scale

KVM_LOOP_C = r"""
#include <linux/kvm.h>
#include <sys/ioctl.h>
/* The same exit storm as the Python loop, handled in C: run until the guest
   writes the exit port; returns the number of exits or -1 on error. */
long run_storm(int fd, struct kvm_run *run) {
    long n = 0;
    for (;;) {
        if (ioctl(fd, KVM_RUN, 0) < 0) return -1;
        n++;
        if (run->exit_reason != KVM_EXIT_IO) return -1;
        if (run->io.port == 0xf4) return n;
    }
}
"""

HOST_BENCH_C = r"""
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>
#include <x86intrin.h>

static inline uint64_t t_start(void) { _mm_lfence(); uint64_t t = __rdtsc(); _mm_lfence(); return t; }
static inline uint64_t t_end(void) { unsigned aux; uint64_t t = __rdtscp(&aux); _mm_lfence(); return t; }

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static uint64_t pct(uint64_t *s, long n, int q) {   /* nearest rank, s sorted */
    long rank = (long)((q * n + 99) / 100);
    if (rank < 1) rank = 1;
    return s[rank - 1];
}

static void *volatile sink;

/* Cost of an empty measurement (median), subtracted from every sample. */
static uint64_t overhead(void) {
    enum { N = 10001 };
    static uint64_t s[N];
    for (int i = 0; i < N; i++) { uint64_t a = t_start(); uint64_t b = t_end(); s[i] = b - a; }
    qsort(s, N, sizeof s[0], cmp_u64);
    return s[N / 2];
}

static void emit_batched(const char *what, long size, long extra, uint64_t *s, long n, uint64_t ovh, long batch) {
    for (long i = 0; i < n; i++) s[i] = (s[i] > ovh ? s[i] - ovh : 0) / batch;
    qsort(s, n, sizeof s[0], cmp_u64);
    printf("{\"what\":\"%s\",\"size\":%ld,\"extra\":%ld,\"n\":%ld,\"p50\":%lu,\"p99\":%lu,"
           "\"min\":%lu,\"max\":%lu,\"overhead\":%lu}\n",
           what, size, extra, n, (unsigned long)pct(s, n, 50), (unsigned long)pct(s, n, 99),
           (unsigned long)s[0], (unsigned long)s[n - 1], (unsigned long)ovh);
}

static void emit(const char *what, long size, long extra, uint64_t *s, long n, uint64_t ovh) {
    emit_batched(what, size, extra, s, n, ovh, 1);
}

/* Operation pairs per sample for malloc+free: one pair is a few TSC ticks,
   so a sample times 16 of them (the guest's CPL3 heap benchmarks do the same). */
enum { MALLOC_BATCH = 16 };

/* malloc(size) + free with `freelist` chunks of the same size already free
   (every other one of 2*freelist, so they cannot coalesce). */
static void *alloc_aligned(long size, long align) {
    return align > 16 ? aligned_alloc(align, (size + align - 1) / align * align) : malloc(size);
}

static void bench_malloc(long size, long iters, long freelist, long align) {
    uint64_t ovh = overhead();
    void **keep = NULL;
    if (freelist > 0) {
        keep = calloc(2 * freelist, sizeof *keep);
        for (long i = 0; i < 2 * freelist; i++) keep[i] = malloc(size);
        for (long i = 0; i < 2 * freelist; i += 2) { free(keep[i]); keep[i] = NULL; }
    }
    uint64_t *s = calloc(iters, sizeof *s);
    for (long i = 0; i < iters / 10; i++) { void *p = alloc_aligned(size, align); sink = p; free(p); }  /* warm up */
    for (long i = 0; i < iters; i++) {
        uint64_t a = t_start();
        for (int k = 0; k < MALLOC_BATCH; k++) {
            void *p = alloc_aligned(size, align);
            sink = p;
            free(p);
        }
        s[i] = t_end() - a;
    }
    emit_batched("malloc_free", size, freelist, s, iters, ovh, MALLOC_BATCH);
}

/* Minor page fault: first touch of each page of a fresh anonymous mapping. */
static void bench_fault(long pages, long reps) {
    uint64_t ovh = overhead();
    uint64_t *s = calloc(pages * reps, sizeof *s);
    long n = 0;
    for (long r = 0; r < reps; r++) {
        volatile char *m = mmap(NULL, pages * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) { perror("mmap"); exit(1); }
        for (long i = 0; i < pages; i++) {
            uint64_t a = t_start();
            m[i * 4096] = 1;
            s[n++] = t_end() - a;
        }
        munmap((void *)m, pages * 4096);
    }
    emit("minor_fault", 4096, 0, s, n, ovh);
}

/* mmap one populated page + munmap (the host's map plus unmap). */
static void bench_map_unmap(long iters) {
    uint64_t ovh = overhead();
    uint64_t *s = calloc(iters, sizeof *s);
    for (long i = 0; i < iters; i++) {
        uint64_t a = t_start();
        void *m = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
        munmap(m, 4096);
        s[i] = t_end() - a;
    }
    emit("map_unmap", 4096, 0, s, iters, ovh);
}

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static void bench_tsc(void) {
    double t0 = now_ns();
    uint64_t c0 = __rdtsc();
    while (now_ns() - t0 < 50e6) { }
    uint64_t c1 = __rdtsc();
    double t1 = now_ns();
    printf("{\"what\":\"tsc\",\"khz\":%.0f}\n", (c1 - c0) / (t1 - t0) * 1e6);
}

/* The KVM setup steps of a minimal C VMM, each timed (ns), one line per rep:
   open + KVM_CREATE_VM; guest RAM (memfd, MAP_NORESERVE); the memory slot;
   KVM_CREATE_VCPU + mapping kvm_run. */
static void bench_kvm_setup(long mem, long reps) {
    for (long r = 0; r < reps; r++) {
        double t0 = now_ns();
        int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
        int vm = kvm < 0 ? -1 : ioctl(kvm, KVM_CREATE_VM, 0);
        if (vm < 0) { perror("KVM_CREATE_VM"); exit(1); }
        double t1 = now_ns();
        int fd = memfd_create("guest-ram", MFD_CLOEXEC);
        if (fd < 0 || ftruncate(fd, mem) < 0) { perror("memfd"); exit(1); }
        void *ram = mmap(NULL, mem, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0);
        struct kvm_userspace_memory_region region = { .slot = 0, .guest_phys_addr = 0,
            .memory_size = (uint64_t)mem, .userspace_addr = (uint64_t)ram };
        if (ram == MAP_FAILED) { perror("mmap"); exit(1); }
        double t2a = now_ns();
        if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) { perror("slot"); exit(1); }
        double t2 = now_ns();
        int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
        long size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
        void *run = vcpu < 0 ? MAP_FAILED : mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
        if (run == MAP_FAILED) { perror("KVM_CREATE_VCPU"); exit(1); }
        double t3 = now_ns();
        printf("{\"what\":\"kvm_setup\",\"create_vm\":%.0f,\"guest_memory\":%.0f,\"memory_slots\":%.0f,"
               "\"vcpu_create\":%.0f}\n", t1 - t0, t2a - t1, t2 - t2a, t3 - t2);
        munmap(run, size); close(vcpu); munmap(ram, mem); close(fd); close(vm); close(kvm);
    }
}

int main(int argc, char **argv) {
    if (argc >= 2 && !strcmp(argv[1], "tsc")) bench_tsc();
    else if (argc >= 5 && !strcmp(argv[1], "malloc")) bench_malloc(atol(argv[2]), atol(argv[3]), atol(argv[4]), argc >= 6 ? atol(argv[5]) : 0);
    else if (argc >= 4 && !strcmp(argv[1], "fault")) bench_fault(atol(argv[2]), atol(argv[3]));
    else if (argc >= 3 && !strcmp(argv[1], "mapunmap")) bench_map_unmap(atol(argv[2]));
    else if (argc >= 4 && !strcmp(argv[1], "kvmsetup")) bench_kvm_setup(atol(argv[2]), atol(argv[3]));
    else {
        fprintf(stderr, "usage: host_bench tsc | malloc SIZE ITERS FREELIST [ALIGN] | fault PAGES REPS | mapunmap ITERS"
                        " | kvmsetup MEMORY REPS\n");
        return 2;
    }
    return 0;
}
"""


class BaselineError(RuntimeError):
    """A host baseline could not be built or run (one-line reason)."""


_BUILD_DIR: Path | None = None
_BUILT: dict[str, Path] = {}


def _build_dir() -> Path:
    global _BUILD_DIR
    if _BUILD_DIR is None:
        _BUILD_DIR = Path(tempfile.mkdtemp(prefix="vmm-bench-"))
        atexit.register(shutil.rmtree, _BUILD_DIR, True)
    return _BUILD_DIR


def compiler() -> str | None:
    return shutil.which("gcc") or shutil.which("cc")


def build(name: str, source: str, *, shared: bool) -> Path:
    """Compile ``source`` with ``gcc -O2`` once per process; the artefact's path."""
    if name in _BUILT:
        return _BUILT[name]
    cc = compiler()
    if cc is None:
        raise BaselineError("no C compiler (gcc) on PATH: host baselines unavailable")
    d = _build_dir()
    src = d / f"{name}.c"
    out = d / (f"{name}.so" if shared else name)
    src.write_text(source)
    cmd = [cc, "-O2", *(["-shared", "-fPIC"] if shared else []), "-o", str(out), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise BaselineError(f"gcc failed building {name}: {tail}")
    _BUILT[name] = out
    return out


def kvm_loop() -> ctypes.CDLL:
    """The C exit-storm loop: ``run_storm(vcpu_fd, kvm_run_address) -> exits``."""
    lib = ctypes.CDLL(str(build("kvm_loop", KVM_LOOP_C, shared=True)))
    lib.run_storm.argtypes = [ctypes.c_int, ctypes.c_void_p]
    lib.run_storm.restype = ctypes.c_long
    return lib


def _run_lines(*args: object, timeout: float = 120.0) -> list[dict]:
    exe = build("host_bench", HOST_BENCH_C, shared=False)
    proc = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise BaselineError(f"host_bench {' '.join(map(str, args))} failed: {proc.stderr.strip()[:200]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def _run(*args: object, timeout: float = 120.0) -> dict:
    return _run_lines(*args, timeout=timeout)[-1]


def tsc_khz() -> float:
    """The host TSC frequency, measured against CLOCK_MONOTONIC over 50 ms."""
    return float(_run("tsc")["khz"])


def cycles_figure(raw: dict, khz: float) -> dict:
    """host_bench's cycle percentiles as a figure in ns (p50 is the median)."""
    fig = {"median": float(raw["p50"]), "min": float(raw["min"]), "max": float(raw["max"]), "n": int(raw["n"]),
           "unit": "cycles", "p50": float(raw["p50"]), "p99": float(raw["p99"])}
    return scale(fig, 1e6 / khz, "ns")


def malloc_free(size: int, iters: int, khz: float, freelist: int = 0, align: int = 0) -> dict:
    """glibc malloc(size) (aligned_alloc above 16-byte alignment) + free, per operation pair, in ns."""
    return cycles_figure(_run("malloc", size, iters, freelist, align), khz)


def minor_fault(pages: int, reps: int, khz: float) -> dict:
    """One Linux minor page fault (anonymous mmap, first write to a page), in ns."""
    return cycles_figure(_run("fault", pages, reps), khz)


def map_unmap(iters: int, khz: float) -> dict:
    """mmap(4 KiB, MAP_POPULATE) + munmap, in ns."""
    return cycles_figure(_run("mapunmap", iters), khz)


def kvm_setup(memory: int, reps: int) -> dict[str, list[float]]:
    """A minimal C VMM's KVM setup steps, ms per rep, keyed like ``Vm.timings_ms``."""
    out: dict[str, list[float]] = {"kvm_create_vm": [], "guest_memory": [], "memory_slots": [], "vcpu_create": []}
    for line in _run_lines("kvmsetup", memory, reps):
        out["kvm_create_vm"].append(line["create_vm"] / 1e6)
        out["guest_memory"].append(line["guest_memory"] / 1e6)
        out["memory_slots"].append(line["memory_slots"] / 1e6)
        out["vcpu_create"].append(line["vcpu_create"] / 1e6)
    return out
