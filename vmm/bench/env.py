"""What every report says about where it was measured."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

from ..backend import BackendInfo
from ..kvm import Kvm, KvmError

REPO = Path(__file__).resolve().parents[2]


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def kvm_tsc_khz() -> int:
    """KVM_GET_TSC_KHZ of a throwaway vCPU (0 if KVM cannot say)."""
    try:
        with Kvm() as kvm:
            vm = kvm.create_vm()
            try:
                vcpu = vm.create_vcpu(0)
                try:
                    return int(vcpu.get_tsc_khz())
                finally:
                    vcpu.close()
            finally:
                vm.close()
    except (OSError, KvmError):
        return 0


def environment(backend: BackendInfo) -> dict:
    return {
        "backend": backend.to_json(),
        "cpu_model": backend.cpu_model,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "kernel_release": platform.release(),
        "machine": platform.machine(),
        "tsc_khz": kvm_tsc_khz(),
        "git_commit": git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
