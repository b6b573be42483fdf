"""Test configuration. The `kvm`/`slow` markers, the skip logic and the
`vmm_boot` fixtures come from our pytest plugin (vmm/pytest_plugin.py),
registered through the package's pytest11 entry point; it is loaded here
too so the suite also runs from a checkout that was not pip-installed."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from vmm.cli import main as vmm_main

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


@dataclass
class CliDone:
    """What `vmm ARGS` ended with, as subprocess.run would say it (text)."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def vmm_cli(capfd):
    """``vmm_cli(*args) -> CliDone``: `vmm ARGS` run in this process, through
    ``vmm.cli.main`` (what the entry point calls), with fds 1 and 2 captured.
    For what the CLI answers to bad input: the same code, without a fresh
    interpreter and its imports (0.1-0.4 s of CPU per call). Tests of the
    process itself (signals, pipes, the entry script, what a fresh process
    imports) spawn `vmm.py`."""

    def _run(*args) -> CliDone:
        capfd.readouterr()  # only what this command writes
        try:
            code = vmm_main([str(a) for a in args])
        except SystemExit as exc:  # argparse ends usage errors with exit(2)
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out, err = capfd.readouterr()
        return CliDone(int(code), out, err)

    return _run
