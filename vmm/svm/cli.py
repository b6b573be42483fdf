"""``vmm svm [options] -- CMD...``: run CMD inside KVM-SVM nested in QEMU TCG.

Exit status: CMD's; 2 for bad usage; 70 when the VM cannot be built or
booted here (no QEMU, no kernel package: run ./setup.sh); 124 on --timeout.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .image import SvmError, build_base
from .options import add_arguments
from .qemu import find_qemu, run

PROJECT = Path(__file__).resolve().parent.parent.parent
EXIT_USAGE, EXIT_HOST = 2, 70


# The SVM pass of .ci/run (`vmm svm --tests`): the `kvm` tests of these paths, run
# inside the VM after the PVM suite. Chosen to cover what differs between
# backends while keeping .ci/run well under its 90 minutes: boot, the in-guest
# tests as items, inspection and fidelity, hostile guests, the pytest plugin,
# the gdb stub and snapshots. Paths that do not exist (yet) are left out.
SVM_PASS = (
    "tests/guest/kernel.ktest",
    "tests/vmm/test_boot_kvm.py",
    "tests/guest/test_guest_boot.py",
    "tests/guest/test_guest_layout.py",
    "tests/guest/test_guest_inspect.py",
    "tests/inspector",
    "tests/vmm/test_translate_kvm.py",
    "tests/vmm/test_hostile_kvm.py",
    "tests/plugin/test_plugin.py",
    "tests/gdbstub",
    "tests/snapshot",
)
# A hung pass must not eat .ci/run's 90 minutes (it takes ~17 min on a busy 2-core host).
SVM_PASS_TIMEOUT = 50 * 60


def svm_pass_command(extra: list[str]) -> list[str]:
    paths = [p for p in SVM_PASS if (PROJECT / p).exists()]
    return ["python3", "-m", "pytest", "-q", "-m", "kvm", "-p", "no:cacheprovider", "-rs", *paths, *extra]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints usage + exits 2 by default)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def run_from_args(args) -> int:
    cmd = list(args.cmd)
    if cmd[:1] == ["--"]:
        cmd = cmd[1:]
    try:
        if args.build_only:
            find_qemu()
            img = build_base(PROJECT, force=args.rebuild, log=lambda m: print(f"svm: {m}", file=sys.stderr))
            how = "cached" if img.cached else f"built in {img.seconds:.1f} s"
            print(f"{img.path} ({img.size / 2**20:.0f} MiB, {how}; Linux {img.linux.release})")
            return 0
        if args.tests:
            cmd = svm_pass_command(cmd)
            args.timeout = args.timeout or SVM_PASS_TIMEOUT
            print(f"svm: SVM pass: {shlex.join(cmd)}", file=sys.stderr, flush=True)
        if not cmd:
            print("svm: error: no command given (usage: python3 -m vmm.svm [options] -- CMD...)", file=sys.stderr)
            return EXIT_USAGE
        result = run(cmd, project=PROJECT, memory=args.memory, smp=args.smp, timeout=args.timeout,
                     verbose=args.verbose, rebuild=args.rebuild)
    except SvmError as exc:
        print(f"svm: error: {exc}", file=sys.stderr)
        return EXIT_HOST
    except KeyboardInterrupt:
        print("svm: interrupted", file=sys.stderr)
        return 130
    if result.failure:
        for line in result.console_head[-20:]:
            print(f"svm| {line}", file=sys.stderr)
        print(f"svm: error: {result.failure}", file=sys.stderr)
    if not args.quiet:
        print(result.summary(), file=sys.stderr)
    return result.exit_code


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="python3 -m vmm.svm", description=__doc__.splitlines()[0],
                epilog="Example: python3 -m vmm.svm -- python3 vmm.py run -c tests=all")
    add_arguments(p)
    return run_from_args(p.parse_args(argv))

