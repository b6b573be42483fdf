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
