"""The pytest plugin, exercised through pytest itself (pytester): inline,
in this process (a fresh config, session and zygote pool each run), except
where the inner run patches the plugin module, which would outlive it here."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest_plugins = ["pytester"]
pytestmark = pytest.mark.kvm


@pytest.fixture
def kernel_opt(guest_kernel_path):
    return f"--vmm-kernel={guest_kernel_path}"


def test_ktest_items_are_collected_from_the_guest(pytester, kernel_opt):
    pytester.makefile(".ktest", kernel="memory = 32M\nselect = frames\n")
    result = pytester.runpytest("-p", "vmm.pytest_plugin", kernel_opt, "--collect-only", "-q")
    names = [line for line in result.outlines if "kernel.ktest::" in line]
    assert names and all("frames::" in n for n in names)


def test_ktest_items_run_and_pass(pytester, kernel_opt):
    pytester.makefile(".ktest", kernel="memory = 32M\nselect = frames::alloc_free_single\n")
    result = pytester.runpytest("-p", "vmm.pytest_plugin", kernel_opt, "-q")
    result.assert_outcomes(passed=1)


def test_guest_that_cannot_list_is_a_collection_error(pytester, kernel_opt):
    pytester.makefile(".ktest", kernel="cmdline = scenario=panic\n")
    result = pytester.runpytest("-p", "vmm.pytest_plugin", kernel_opt, "-q")
    result.assert_outcomes(errors=1)
    assert "did not list its tests" in result.stdout.str()


def test_vmm_boot_fixture(pytester, kernel_opt):
    pytester.makepyfile(
        """
        def test_boot(vmm_boot):
            run = vmm_boot("scenario=panic", memory=32 << 20)
            assert run.exit_code == 3
            assert "PANIC" in run.serial
            assert run.page_tables()
            assert "guest stopped" in run.describe()
        """
    )
    result = pytester.runpytest("-p", "vmm.pytest_plugin", kernel_opt, "-q")
    result.assert_outcomes(passed=1)


def test_failure_report_shows_serial_registers_and_symbol(pytester, kernel_opt, monkeypatch):
    """A guest that stops before reporting its test: the failure carries the
    stop reason, the serial tail, the registers and the symbolized RIP."""
    # The listing boot is normal; the test's own boot halts (scenario=hlt).
    pytester.makefile(".ktest", kernel="memory = 32M\nselect = frames::alloc_free_single\n")
    pytester.makeconftest(
        """
        import vmm.pytest_plugin as P
        _orig = P.boot_guest
        def boot_guest(image, *, cmdline="", **kw):
            if "tests=frames::alloc_free_single" in cmdline and "tests=list" not in cmdline:
                cmdline = "scenario=hlt " + cmdline
            return _orig(image, cmdline=cmdline, **kw)
        P.boot_guest = boot_guest
        """
    )
    # --vmm-cold: the injected scenario goes through boot_guest, which a
    # zygote-started VM does not call. The inner pytest imports the plugin of
    # this checkout, not whatever an installed package points at.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))))
    result = pytester.runpytest_subprocess("-p", "vmm.pytest_plugin", kernel_opt, "-q", "--vmm-cold")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "stopped before reporting this test" in out
    assert "guest stopped: halted" in out and "--- serial" in out
    assert "registers at the stop (RIP" in out and "kernel::" in out
