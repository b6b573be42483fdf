"""One boot in a fresh process: ``python3 -m vmm.bench.child KERNEL MEMORY [CMDLINE]``.

Used for the figures only a new process shows: process start to the first
guest instruction and to READY, and the host memory a guest costs (RSS
beyond the guest RAM it touched). Prints one JSON object: CLOCK_MONOTONIC
timestamps in ns (comparable with the parent's ``time.monotonic_ns()``), the
VM's own step timings, and RSS before and after the boot.
"""

import time

T_MAIN = time.monotonic_ns()  # before any import of ours: the interpreter is up

import json  # noqa: E402
import sys  # noqa: E402


def rss_kib(path: str = "/proc/self/status") -> dict[str, int]:
    """VmRSS and its parts (RssAnon, RssFile, RssShmem), in KiB."""
    out = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def main(argv: list[str]) -> int:
    kernel, memory = argv[0], int(argv[1])
    cmdline = argv[2] if len(argv) > 2 else ""
    from vmm.elf import load_kernel_file
    from vmm.vm import Vm, VmConfig

    t_imports = time.monotonic_ns()
    image = load_kernel_file(kernel)
    t_kernel = time.monotonic_ns()
    rss_before = rss_kib()
    t_vm = time.monotonic_ns()
    with Vm(image, VmConfig(memory=memory, cmdline=cmdline, timeout=300)) as vm:
        result = vm.run()
        rss_after = rss_kib()
        resident = vm.memory.resident_bytes()
    t_end = time.monotonic_ns()
    print(json.dumps({
        "t_main": T_MAIN, "t_imports": t_imports, "t_kernel": t_kernel, "t_vm": t_vm, "t_end": t_end,
        "timings_ms": result.timings_ms, "exit_code": result.exit_code, "message": result.message,
        "rss_before_kib": rss_before, "rss_after_kib": rss_after, "guest_resident_bytes": resident,
        "memory": memory, "backend": result.backend,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
