"""pytest plugin: boot guests from tests, and run the guest's own tests as items.

Registered through the ``pytest11`` entry point of this package, so any
project that installs it gets:

- markers ``kvm`` (skipped, with the reason, where /dev/kvm is absent or
  unusable) and ``slow``;
- fixtures ``vmm_kernel_path`` / ``vmm_kernel`` (the guest kernel, built once
  per session) and ``vmm_boot`` (boot a VM, get a ``GuestRun`` handle with its
  serial output, exit code, reports and the inspection API); ``vmm_vm`` (a
  VM not yet run, for tests that drive the run themselves) and ``vmm_ready``
  (the default guest parked at READY);
- ``*.ktest`` files: each one is collected into one pytest item per in-guest
  test, listed by the guest itself (``tests=list``), each run in its own VM.

Options: ``--vmm-kernel PATH`` (or env ``VMM_TEST_KERNEL``) tests a prebuilt
kernel; ``--vmm-timeout S`` is the per-boot watchdog; ``--vmm-cold`` boots
every VM cold instead of starting it from a zygote (``vmm.snapshot.zygote``:
one boot per kernel, memory and boot-time words, snapshotted after READY;
test VMs are forks of it or reset to it in place).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mm import walker
from mm.flags import ADDR_MASK

from .abi import ExitCode, ReportKind
from .devices import Stop
from .elf import load_kernel_file
from .guest_build import GuestBuildError, build_guest, built_kernel_sha256
from .inspector.snapshot import take_snapshot
from .inspector.target import LocalTarget
from .inspector.views import audits
from .kernel_cache import load_cached_kernel
from .kvm import Kvm
from .snapshot.format import SnapshotError
from .snapshot.zygote import Zygote, split_cmdline
from .start_tally import COLD, FORK, RESET, StartTally
from .units import parse_size
from .vm import Vm, VmConfig

DEFAULT_MEMORY = 64 << 20
DEFAULT_TIMEOUT = 60.0
SERIAL_TAIL_LINES = 30


# --- environment ---------------------------------------------------------------------
_KVM_REASON: list[str | None] = []


def kvm_unavailable_reason() -> str | None:
    """Why guests cannot boot here, or None if /dev/kvm works (cached)."""
    if _KVM_REASON:
        return _KVM_REASON[0]
    reason = None
    if os.environ.get("VMM_TEST_NO_KVM"):
        reason = "VMM_TEST_NO_KVM is set (simulating a machine without KVM)"
    elif not os.path.exists("/dev/kvm"):
        reason = "/dev/kvm does not exist (no KVM on this machine)"
    elif not os.access("/dev/kvm", os.R_OK | os.W_OK):
        reason = "/dev/kvm is not readable and writable by this user"
    else:
        try:
            with Kvm():
                pass
        except OSError as exc:
            reason = f"/dev/kvm is unusable: {exc}"
    _KVM_REASON.append(reason)
    return reason


def pytest_addoption(parser):
    group = parser.getgroup("vmm", "booting guests with the Python VMM")
    group.addoption("--vmm-kernel", metavar="PATH", help="test this kernel instead of building guest/")
    group.addoption(
        "--vmm-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S", help="watchdog per guest boot (default 60 s)"
    )
    group.addoption(
        "--vmm-cold", action="store_true",
        help="boot every test VM cold instead of starting it from a zygote snapshot taken after READY",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "kvm: needs a usable /dev/kvm (skipped with the reason where it is absent)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_collection_modifyitems(config, items):
    reason = kvm_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "kvm" in item.keywords:
            item.add_marker(skip)


# --- kernel -------------------------------------------------------------------------------
def _kernel_path(config) -> Path:
    explicit = config.getoption("--vmm-kernel", None) or os.environ.get("VMM_TEST_KERNEL")
    if explicit:
        return Path(explicit)
    cached = getattr(config, "_vmm_kernel_path", None)
    if cached is None:
        cached = build_guest(quiet=True)
        config._vmm_kernel_path = cached
    return cached


def _kernel_image(config):
    image = getattr(config, "_vmm_kernel_image", None)
    if image is None:
        path = _kernel_path(config)
        image = load_cached_kernel(path, built_kernel_sha256(path))  # symbols and boot plans from <kernel>.cache
        config._vmm_kernel_image = image
    return image


@pytest.fixture(scope="session")
def vmm_kernel_path(pytestconfig) -> Path:
    """Path of the guest kernel under test, built once per session."""
    try:
        return _kernel_path(pytestconfig)
    except GuestBuildError as exc:
        pytest.fail(f"guest kernel cannot be built: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def vmm_kernel(pytestconfig, vmm_kernel_path):
    """The parsed guest kernel (``vmm.elf.KernelImage``)."""
    return _kernel_image(pytestconfig)


# --- booting ------------------------------------------------------------------------------
@dataclass
class GuestRun:
    """One finished guest boot. The VM stays open until the test ends, so
    its memory and page tables can still be inspected."""

    result: object  # vmm.vm.RunResult
    vm: object  # vmm.vm.Vm
    cmdline: str = ""
    _tests: dict | None = field(default=None, repr=False)

    @property
    def exit_code(self) -> int:
        return self.result.exit_code

    @property
    def serial(self) -> str:
        return self.result.serial.decode("utf-8", "replace")

    @property
    def reports(self) -> list:
        return self.result.reports

    def reports_of(self, kind) -> list:
        return self.result.reports_of(kind)

    @property
    def test_results(self) -> dict:
        """In-guest test name -> its TEST_RESULT report."""
        if self._tests is None:
            self._tests = {r.get("name"): r for r in self.result.reports_of(ReportKind.TEST_RESULT)}
        return self._tests

    # inspection API -------------------------------------------------------------
    @property
    def cr3(self) -> int:
        return self.vm.vcpu.get_sregs().cr3 & ADDR_MASK

    def page_tables(self, start: int = 0, end: int | None = None) -> list:
        """Coalesced runs of the guest's live page tables (``mm.walker.Run``)."""
        return list(walker.walk(self.vm.memory, self.cr3, start, end, **self._cpu))

    def translate(self, virt: int):
        return walker.translate(self.vm.memory, self.cr3, virt, **self._cpu)

    @property
    def _cpu(self) -> dict:
        """Walk as this vCPU would: its MAXPHYADDR and 1 GiB-page support."""
        f = self.vm.cpu_features
        return {"maxphyaddr": f.maxphyaddr, "gbpages": f.gbpages}

    def read_phys(self, paddr: int, n: int) -> bytes:
        return self.vm.memory.read(paddr, n)

    def describe(self) -> str:
        """Stop reason, serial tail and (for crashes) registers: for failure reports."""
        r = self.result
        lines = [f"guest stopped: {r.stop_reason}: {r.message} (exit code {r.exit_code})"]
        if self.cmdline:
            lines.append(f"command line: {self.cmdline}")
        tail = self.serial.splitlines()[-SERIAL_TAIL_LINES:]
        lines.append(f"--- serial (last {len(tail)} lines) ---")
        lines += tail
        registers, rip = r.registers, r.rip_symbol
        if registers is None and self.vm is not None and self.vm.vcpu is not None:
            # A clean exit: the vCPU's final state still says where it stopped.
            registers = self.vm.register_dump()
            rip = self.vm.symbolizer.format(registers["rip"])
        if registers is not None:
            lines.append(f"--- registers at the stop (RIP {rip}) ---")
            lines.append(Vm.format_registers(registers))
        if r.fault is not None:
            lines.append(f"--- guest fault report (RIP {r.fault.get('rip_symbol', '?')}) ---")
            lines.append(", ".join(f"{k}={v}" for k, v in r.fault.items()))
        if r.diagnosis is not None:
            lines.append("--- code and backtrace ---")
            lines.append(r.diagnosis.render())
        return "\n".join(lines)


SECURITY_KINDS = ("wx", "user_in_kernel_half", "guard_page_mapped")


def security_violations(vm) -> list[str]:
    """The guest's final page tables against the security properties every
    boot must keep: no W+X page, no user page in the kernel half, every
    stack's guard pages unmapped."""
    return [str(f) for f in audits(take_snapshot(LocalTarget(vm))) if f.kind in SECURITY_KINDS]


def boot_guest(image, *, cmdline: str = "", memory: int = DEFAULT_MEMORY, timeout: float = DEFAULT_TIMEOUT, **kw):
    """Boot ``image`` to completion; returns (Vm still open, RunResult)."""
    vm = Vm(image, VmConfig(memory=memory, cmdline=cmdline, timeout=timeout, **kw))
    try:
        return vm, vm.run()
    except BaseException:
        vm.close()
        raise


def _cold_start_ms(vm) -> float | None:
    """A cold VM's time to a booted guest: setup, then the run to READY
    (None if it never reported READY: nothing comparable to a start)."""
    if vm.ready_ns is None or vm.setup_done_ns is None:
        return None
    return vm.timings_ms.get("setup_total", 0.0) + (vm.ready_ns - vm.setup_done_ns) / 1e6


def _count_cold(starts: StartTally, vm, reason: str) -> None:
    ms = _cold_start_ms(vm)
    if ms is not None:
        starts.add(COLD, ms, reason)


def _count_fork(starts: StartTally, zygote: Zygote, vm) -> None:
    starts.add(FORK, vm.timings_ms.get("setup_total", 0.0), cold_equivalent_ms=zygote.cold_start_ms)


# --- zygotes: test VMs that start after READY -------------------------------------------------
class _ZygotePool:
    """One zygote per (kernel, memory, boot words) for the session, and the
    idle VMs forked from it. A VM handed back after a clean exit is reset in
    place for the next test (only its dirtied pages copied back: the faster
    mechanism here, see `vmm bench`); with none idle a fresh one is forked
    (copy-on-write RAM)."""

    def __init__(self):
        self.zygotes: dict = {}
        self.idle: dict = {}
        self.cold: set = set()  # keys whose boot never reaches the wait for work
        # Every image keyed so far, by id(): held for the session, so that no
        # later object (a rebuilt kernel at the same path) can take an id in a key.
        self.images: dict[int, object] = {}
        self.starts = StartTally()  # the session's summary line (pytest_terminal_summary)

    def zygote(self, image, memory: int, boot: str, timeout: float):
        """(key, Zygote) for these boot-time words, booted on first use; the
        Zygote is None if that boot never reaches the wait for work."""
        self.images[id(image)] = image
        key = (image.path, id(image), memory, boot)
        z = self.zygotes.get(key)
        if z is None and key not in self.cold:
            try:
                z = self.zygotes[key] = Zygote(image, memory, boot, timeout=max(timeout, 60.0))
                self.idle[key] = []
                self.starts.add_zygote_boot(z.boot_ms)
            except SnapshotError:
                self.cold.add(key)
        return key, z

    def start(self, image, memory: int, cmdline: str, timeout: float):
        """(vm, result) of ``cmdline`` run from the zygote point (or cold, if
        its boot-time words end the run before READY)."""
        boot, work = split_cmdline(cmdline)
        key, z = self.zygote(image, memory, boot, timeout)
        if z is None:
            vm, result = boot_guest(image, cmdline=cmdline, memory=memory, timeout=timeout)
            _count_cold(self.starts, vm, "boot-time words that end before the wait for work")
            return vm, result
        idle = self.idle[key]
        if idle:
            vm = idle.pop()
            self.starts.add(RESET, z.reset(vm, work)["total_us"] / 1e3, cold_equivalent_ms=z.cold_start_ms)
        else:
            vm = z.fork(work)
            _count_fork(self.starts, z, vm)
        vm.config.timeout = timeout
        vm.zygote_key = key
        try:
            result = vm.run()
        except BaseException:
            vm.close()
            raise
        return vm, z.full_result(result)

    def release(self, vm, result) -> None:
        """A VM the test is done with: kept for a reset if it ended cleanly."""
        key = getattr(vm, "zygote_key", None)
        if key in self.idle and result.stop_reason == "exit" and len(self.idle[key]) < 2 and vm.vcpu is not None:
            self.idle[key].append(vm)
        else:
            vm.close()

    def close(self) -> None:
        for vms in self.idle.values():
            for vm in vms:
                vm.close()
        for z in self.zygotes.values():
            z.close()
        self.zygotes.clear()
        self.idle.clear()
        self.cold.clear()
        self.images.clear()


def _pool(config) -> _ZygotePool:
    pool = getattr(config, "_vmm_zygotes", None)
    if pool is None:
        pool = config._vmm_zygotes = _ZygotePool()
    return pool


def pytest_sessionfinish(session):
    # An xdist worker: its tally goes to the controller, which prints one line for all.
    workeroutput = getattr(session.config, "workeroutput", None)
    pool = getattr(session.config, "_vmm_zygotes", None)
    if workeroutput is not None and pool is not None:
        workeroutput["vmm_starts"] = pool.starts.to_json()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """pytest-xdist: a worker is done; its VM starts join the controller's."""
    data = getattr(node, "workeroutput", {}).get("vmm_starts")
    if data:
        _pool(node.config).starts.merge(data)


def pytest_terminal_summary(terminalreporter, config):
    pool = getattr(config, "_vmm_zygotes", None)
    line = pool.starts.summary() if pool is not None else None
    if line is not None:
        terminalreporter.write_line(line)


def _cold_reason(config, *, fresh: bool = False, kernel=None, fields=()) -> str:
    """Why a test VM boots cold, as the summary line names it."""
    if not _use_zygote(config):
        return "--vmm-cold"
    if fresh:
        return "fresh=True"
    if kernel is not None:
        return "a kernel of the test's own"
    return "VmConfig fields: " + ", ".join(sorted(fields))


def pytest_unconfigure(config):
    pool = getattr(config, "_vmm_zygotes", None)
    if pool is not None:
        pool.close()


def _use_zygote(config) -> bool:
    """From a zygote unless --vmm-cold (the failure scenarios too: they act
    after READY, so a fork stops where a cold boot does)."""
    return not config.getoption("--vmm-cold", False)


@pytest.fixture
def vmm_boot(request, pytestconfig):
    """Factory: ``vmm_boot(cmdline="", memory=64 << 20, timeout=None, tests=None,
    kernel=None, fresh=False, **VmConfig fields) -> GuestRun``. VMs close at teardown.

    By default the VM starts from a zygote of the same kernel, memory and
    boot-time words (snapshotted once per session after READY): the run's
    serial output and reports read as a cold boot's, but every such VM shares
    the zygote's KASLR slide and boot-time randomness. ``fresh=True``,
    ``--vmm-cold``, an explicit ``kernel`` or any VmConfig field boot cold."""
    reason = kvm_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    opened = []
    default_timeout = pytestconfig.getoption("--vmm-timeout", DEFAULT_TIMEOUT)
    pool = _pool(pytestconfig)

    def _boot(cmdline: str = "", *, memory: int = DEFAULT_MEMORY, timeout: float | None = None, tests: str | None = None,
              kernel=None, fresh: bool = False, **kw) -> GuestRun:
        image = kernel if kernel is not None else _kernel_image(pytestconfig)
        if isinstance(image, (str, Path)):
            image = load_kernel_file(image)
        if tests:
            cmdline = f"{cmdline} tests={tests}".strip()
        timeout = timeout or default_timeout
        if not fresh and not kw and kernel is None and _use_zygote(pytestconfig):
            vm, result = pool.start(image, memory, cmdline, timeout)
            opened.append((vm, result))
        else:
            vm, result = boot_guest(image, cmdline=cmdline, memory=memory, timeout=timeout, **kw)
            opened.append((vm, None))
            _count_cold(pool.starts, vm, _cold_reason(pytestconfig, fresh=fresh, kernel=kernel, fields=kw))
        return GuestRun(result, vm, cmdline)

    yield _boot
    for vm, result in opened:
        if result is not None:
            pool.release(vm, result)
        else:
            vm.close()


def _stop_at_ready(report):
    return Stop(ExitCode.SUCCESS, "ready", "parked at READY") if report.kind == ReportKind.READY else None


@pytest.fixture
def vmm_vm(pytestconfig):
    """Factory for tests that drive the run themselves (watch it from another
    thread, stop it at a report, serve it on a control socket):
    ``vmm_vm(cmdline="", *, memory=64 << 20, timeout=None, on_report=None,
    console=None, dirty_log=False, fresh=False) -> Vm``, a VM that has not run yet, whose
    ``run()`` does ``cmdline``'s work. VMs close at teardown.

    By default it is a fork of the zygote for ``cmdline``'s boot-time words,
    parked after READY with the work words in its mailbox: ``run()`` returns
    what comes after READY (``on_report`` never sees the boot's reports), and
    the VM shares the zygote's KASLR slide. ``fresh=True`` and ``--vmm-cold``
    give ``Vm(...)`` itself, to run from its first instruction."""
    reason = kvm_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    opened: list = []
    default_timeout = pytestconfig.getoption("--vmm-timeout", DEFAULT_TIMEOUT)

    def _vm(cmdline: str = "", *, memory: int = DEFAULT_MEMORY, timeout: float | None = None, on_report=None,
            console=None, dirty_log: bool = False, fresh: bool = False):
        image = _kernel_image(pytestconfig)
        timeout = timeout or default_timeout
        z = None
        if not fresh and _use_zygote(pytestconfig):
            boot, work = split_cmdline(cmdline)
            _, z = _pool(pytestconfig).zygote(image, memory, boot, timeout)
        if z is not None:
            # Dirty logging only if asked, as for a cold VM: the inspector
            # reads the log when it has one, and both modes must take one path.
            vm = z.fork(work, console=console, on_report=on_report, timeout=timeout, dirty_log=dirty_log)
            _count_fork(_pool(pytestconfig).starts, z, vm)
        else:
            vm = Vm(image, VmConfig(memory=memory, cmdline=cmdline, timeout=timeout, dirty_log=dirty_log),
                    console=console, on_report=on_report)
            cold.append((vm, _cold_reason(pytestconfig, fresh=fresh)))
        opened.append(vm)
        return vm

    cold: list = []
    yield _vm
    for vm, reason in cold:  # counted once run: the start of a cold VM ends at its READY
        _count_cold(_pool(pytestconfig).starts, vm, reason)
    for vm in opened:
        vm.close()


@pytest.fixture
def vmm_ready(vmm_vm):
    """Factory: ``vmm_ready(*, memory=64 << 20, dirty_log=False, fresh=False) -> Vm``, the
    default guest parked just after READY, for tests that look at a booted
    guest: an unrun fork of the zygote (already there), or with
    ``fresh=True``/``--vmm-cold`` a cold boot run until its READY report."""

    def _ready(*, memory: int = DEFAULT_MEMORY, dirty_log: bool = False, fresh: bool = False):
        vm = vmm_vm("", memory=memory, on_report=_stop_at_ready, dirty_log=dirty_log, fresh=fresh)
        if getattr(vm, "forked_from", None) is None:
            result = vm.run()
            if result.stop_reason != "ready":
                raise AssertionError(f"the guest did not reach READY: {result.stop_reason}: {result.message}")
        return vm

    return _ready


# --- in-guest tests as pytest items ------------------------------------------------------------
def pytest_collect_file(file_path: Path, parent):
    if file_path.suffix == ".ktest":
        return GuestTestFile.from_parent(parent, path=file_path)
    return None


def _parse_ktest(text: str) -> dict[str, str]:
    """``key = value`` lines; '#' starts a comment."""
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


class GuestTestFile(pytest.File):
    """A ``.ktest`` file: which kernel to boot and how; the guest lists its tests.

    Keys: ``memory`` (e.g. 64M), ``cmdline`` (extra words), ``select``
    (comma-separated groups or tests, default all), ``timeout`` (seconds).
    """

    def collect(self):
        spec = _parse_ktest(self.path.read_text())
        self.memory = parse_size(spec.get("memory", "64M"))
        self.extra = spec.get("cmdline", "")
        self.timeout = float(spec["timeout"]) if "timeout" in spec else None
        select = {s.strip() for s in spec.get("select", "all").split(",") if s.strip()}
        reason = kvm_unavailable_reason()
        if reason is not None:
            yield GuestTestItem.from_parent(self, name="<kvm unavailable>", test=None, skip_reason=reason)
            return
        image = _kernel_image(self.config)
        cmdline = f"{self.extra} tests=list".strip()
        # The listing starts from the zygote its items will (booted here, once).
        if _use_zygote(self.config):
            pool = _pool(self.config)
            vm, result = pool.start(image, self.memory, cmdline, 60)
            pool.release(vm, result)
        else:
            vm, result = boot_guest(image, cmdline=cmdline, memory=self.memory, timeout=60)
            _count_cold(_pool(self.config).starts, vm, "--vmm-cold")
            vm.close()
        listing = result.reports_of(ReportKind.TEST_LIST)
        if not listing:
            raise self.CollectError(
                f"the guest did not list its tests (tests=list): {result.stop_reason}: {result.message}"
            )
        names = [n for n in (listing[0].get("names") or "").split(",") if n]
        for name in names:
            if "all" in select or name in select or name.split("::")[0] in select:
                yield GuestTestItem.from_parent(self, name=name, test=name, skip_reason=None)


class GuestTestFailure(Exception):
    def __init__(self, summary: str, run: GuestRun | None):
        super().__init__(summary)
        self.summary = summary
        # Described now, while the VM (and its vCPU state) still exists.
        self.details = run.describe() if run is not None else ""


class GuestTestItem(pytest.Item):
    """One in-guest test, run in a VM of its own (``tests=<name>``)."""

    def __init__(self, *, test: str | None, skip_reason: str | None, **kw):
        super().__init__(**kw)
        self.test = test
        self.skip_reason = skip_reason
        self.add_marker(pytest.mark.kvm)

    def runtest(self):
        if self.skip_reason is not None:
            pytest.skip(self.skip_reason)
        parent: GuestTestFile = self.parent
        timeout = parent.timeout or self.config.getoption("--vmm-timeout", DEFAULT_TIMEOUT)
        cmdline = f"{parent.extra} tests={self.test}".strip()
        image = _kernel_image(self.config)
        zygote = _use_zygote(self.config)
        if zygote:
            vm, result = _pool(self.config).start(image, parent.memory, cmdline, timeout)
        else:
            vm, result = boot_guest(image, cmdline=cmdline, memory=parent.memory, timeout=timeout)
            _count_cold(_pool(self.config).starts, vm, "--vmm-cold")
        try:
            run = GuestRun(result, vm, cmdline)
            report = run.test_results.get(self.test)
            if report is None:
                raise GuestTestFailure(f"{self.test}: the guest stopped before reporting this test", run)
            status = report.get("status")
            if status == "skip":
                pytest.skip(report.get("msg") or "skipped by the guest")
            if status != "pass":
                raise GuestTestFailure(f"{self.test}: {report.get('msg') or 'failed'}", run)
            violations = security_violations(vm)
            if violations:
                raise GuestTestFailure(
                    f"{self.test}: passed, but left the guest insecure: " + "; ".join(violations[:5]), run
                )
        finally:
            if zygote:
                _pool(self.config).release(vm, result)
            else:
                vm.close()

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, GuestTestFailure):
            exc = excinfo.value
            return exc.summary + ("\n" + exc.details if exc.details else "")
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, 0, f"guest: {self.name}"
