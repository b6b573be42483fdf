"""Shared test configuration: the `kvm` marker skips with a clear reason."""

from __future__ import annotations

import os

import pytest


def kvm_unavailable_reason() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist (no KVM on this machine)"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    try:
        from vmm.kvm import Kvm

        with Kvm():
            pass
    except OSError as exc:
        return f"/dev/kvm is unusable: {exc}"
    return None


_REASON = kvm_unavailable_reason()


def pytest_collection_modifyitems(config, items):
    if _REASON is None:
        return
    skip = pytest.mark.skip(reason=_REASON)
    for item in items:
        if "kvm" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def guest_kernel_path():
    """The default guest kernel, built once per session (cached by source hash)."""
    from vmm.guest_build import GuestBuildError, build_guest

    override = os.environ.get("VMM_TEST_KERNEL")
    if override:  # test a prebuilt kernel instead of building guest/
        return override
    try:
        return build_guest(quiet=True)
    except GuestBuildError as exc:
        pytest.skip(f"guest kernel cannot be built here: {exc}")


@pytest.fixture(scope="session")
def guest_image(guest_kernel_path):
    from vmm.elf import load_kernel_file

    return load_kernel_file(guest_kernel_path)


@pytest.fixture
def boot(guest_image):
    """Boot the default guest: boot(cmdline=..., memory=..., timeout=...) -> RunResult."""
    from vmm.vm import Vm, VmConfig

    def _boot(cmdline: str = "", memory: int = 64 << 20, timeout: float = 30.0, **kw):
        with Vm(guest_image, VmConfig(memory=memory, cmdline=cmdline, timeout=timeout, **kw)) as vm:
            return vm.run()

    return _boot
