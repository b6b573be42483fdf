"""Test configuration. The `kvm`/`slow` markers, the skip logic and the
`vmm_boot` fixtures come from our pytest plugin (vmm/pytest_plugin.py),
registered through the package's pytest11 entry point; it is loaded here
too so the suite also runs from a checkout that was not pip-installed."""

from __future__ import annotations

import pytest

try:  # installed: the pytest11 entry point has loaded it already
    import importlib.metadata as _md

    _installed = any(ep.value == "vmm.pytest_plugin" for ep in _md.entry_points(group="pytest11"))
except Exception:  # pragma: no cover
    _installed = False
if not _installed:
    pytest_plugins = ["vmm.pytest_plugin"]


@pytest.fixture(scope="session")
def guest_kernel_path(vmm_kernel_path):
    return vmm_kernel_path


@pytest.fixture(scope="session")
def guest_image(vmm_kernel):
    return vmm_kernel


@pytest.fixture
def boot(vmm_boot):
    """Boot the default guest and return its RunResult (VM closed at teardown)."""

    def _boot(cmdline: str = "", memory: int = 64 << 20, timeout: float = 30.0, **kw):
        return vmm_boot(cmdline, memory=memory, timeout=timeout, **kw).result

    return _boot
