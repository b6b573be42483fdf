"""Test VMs that start after READY in well under a boot: a zygote and its forks.

A ``Zygote`` boots a guest once with ``zygote=1``: after READY the guest
asks the host for work (``vmm.devices.WorkMailbox``) and the run stops there.
Its RAM (a memfd, never run again) and vCPU state are the starting point of
every VM made from it, in one of two ways:

- ``fork()``: a fresh VM whose RAM is a copy-on-write private mapping of the
  zygote's memfd (MAP_PRIVATE): nothing is copied up front, a page is copied
  by the kernel when the guest first writes it;
- ``reset(vm)``: an existing fork goes back to the zygote point in place:
  only the pages KVM's dirty log says were written since (plus the mailbox,
  which the host writes itself) are copied back (zeroed, when the zygote's
  page is all zero: ``data_pages``), then the vCPU state.

Either way the guest then finds its work in the mailbox and runs. Every VM
from one zygote shares its KASLR slide (and everything else decided before
READY); tests about KASLR must boot cold.
"""

from __future__ import annotations


import dataclasses
import time

from .. import kvm_abi as K
from ..abi import ReportKind
from ..memory import GuestMemory
from ..vm import Vm, VmConfig
from ..vm_builder import build_machine
from .format import SnapshotError, VcpuState
from .spare import SpareMachines
from .vcpu import FastLoader, capture, complete_pending_io

PAGE = 4096
_BOXES_KEPT = 64  # mailbox images (one per distinct work) a zygote keeps

# Command-line words the guest only reads after READY: the work (the failure
# scenarios too: they act after READY). Every other word shapes the boot and
# so belongs to the zygote's identity.
WORK_WORDS = frozenset({"tests", "bench", "workload", "workload_ms", "workload_iters", "frag_blocks",
                        "touch_pages", "touch_stride", "scenario"})


def split_cmdline(cmdline: str) -> tuple[str, str]:
    """(boot words, work words) of a command line."""
    boot, work = [], []
    for word in cmdline.split():
        (work if word.split("=", 1)[0] in WORK_WORDS else boot).append(word)
    return " ".join(boot), " ".join(work)


class _ForkSource:
    """``Vm(restore=...)`` from a zygote: CoW RAM, saved vCPU state."""

    def __init__(self, zygote: "Zygote", spare: bool = False):
        self.zygote = zygote
        self.spare = spare
        self.slide = zygote.slide
        self.inspect_fields = zygote.inspect_fields
        # What a save of a fork records about where it came from (machine.state_of).
        self.meta = {"cmdline": f"{zygote.boot_cmdline} zygote=1".strip(),
                     "serial_offset": len(zygote.boot_result.serial)}

    def make_memory(self, config):
        return GuestMemory(self.zygote.memory.size, copy_on_write_of=self.zygote.memory.fd)

    def take_machine(self, config):
        """The zygote's spare machine for ``config``, if one is ready or being built."""
        return self.zygote._spares.take(_machine_key(config)) if self.spare else None

    def load_vcpu(self, vcpu) -> None:
        # The reset's loader: its MSR batch is made once per zygote, so a
        # fork reads no MSRs and builds no ctypes buffer.
        self.zygote._loader.load(vcpu)


def _machine_key(config: VmConfig) -> tuple:
    """What a fork's machine depends on, before its vCPU state."""
    return (config.memory, config.shared_memory, config.protect_kernel, config.dirty_log, config.dirty_mechanism,
            config.coalesce_serial)


class Zygote:
    """One booted guest parked at its request for work."""

    def __init__(self, image, memory: int, boot_cmdline: str = "", *, timeout: float = 60.0, backend=None):
        self.image = image
        self.boot_cmdline = boot_cmdline
        self.timeout = timeout
        t0 = time.perf_counter_ns()
        cmd = f"{boot_cmdline} zygote=1".strip()
        vm = Vm(image, VmConfig(memory=memory, cmdline=cmd, timeout=timeout), backend=backend)
        try:
            result = vm.run()
            if result.stop_reason != "waiting-for-work":
                raise SnapshotError(
                    f"zygote boot ({cmd!r}) did not reach its wait for work: {result.stop_reason}: {result.message}"
                )
            complete_pending_io(vm.vcpu)  # RIP past the OUT
            self.vcpu_state: VcpuState = capture(vm.vcpu, vm.kvm, vm.tsc_khz)
            self.mailbox = vm.work.mailbox
            self.slide = vm.slide
            self.tsc_khz = vm.tsc_khz
            self.backend = vm.backend
            self.boot_result = result
            self.inspect_fields = {}
            for r in result.reports:
                if r.kind == ReportKind.INSPECT:
                    self.inspect_fields = dict(r.fields)
            # Keep the RAM, drop KVM: the memfd is the zygote's image from now on.
            self.memory = vm.memory
            vm.memory = None
            # Which of its pages hold data (the others are zero): a reset zeroes
            # those instead of copying them. Never written again, so it stays true.
            self.data_pages = self.memory.data_pages()
        finally:
            vm.close()
        self.boot_ms = (time.perf_counter_ns() - t0) / 1e6
        self._loader = FastLoader(self.vcpu_state)
        self._boxes: dict[tuple[str, int], tuple[bytes, int]] = {}  # (work, bytes written before) -> _box_image
        self._synced: bool | None = None  # KVM_CAP_SYNC_REGS covers regs, sregs and events (asked at the first reset)
        # The next fork's machine, built while the last fork runs (vmm.snapshot.spare).
        self._spares = SpareMachines(self._build_spare, name="zygote-spare")

    @property
    def cold_start_ms(self) -> float:
        """What its boot took to READY (setup and run): the cost of a cold
        start of the same kernel, memory and boot words."""
        t = self.boot_result.timings_ms
        return t.get("setup_total", 0.0) + t.get("to_ready", t.get("run", 0.0))

    def _build_spare(self, config: VmConfig):
        """A machine for forks with ``config`` (that of the fork that asked
        for it: what it depends on is ``_machine_key``), vCPU state not loaded."""
        return build_machine(self.image, config, self.backend, _ForkSource(self), load_state=False)

    def close(self) -> None:
        spares = getattr(self, "_spares", None)
        if spares is not None:
            spares.close()
        if self.memory is not None:
            self.memory.close()
            self.memory = None

    def __enter__(self) -> "Zygote":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- making VMs -------------------------------------------------------------------
    def fork(self, work: str = "", *, console=None, on_report=None, dirty_log: bool = True, timeout=None,
             dirty_mechanism: str = "auto", spare: bool = True) -> Vm:
        """A fresh VM at the zygote point with ``work`` in its mailbox
        (``dirty_mechanism``: see ``vmm.vm_builder.choose_dirty_tracking``).
        ``spare``: take the machine built ahead for this configuration, if
        there is one, and have the next one built (``vmm.snapshot.spare``);
        False builds everything now (what ``vmm bench`` compares with)."""
        config = VmConfig(memory=self.memory.size, cmdline=self.boot_cmdline, slide=self.slide,
                          timeout=timeout if timeout is not None else self.timeout, dirty_log=dirty_log,
                          dirty_mechanism=dirty_mechanism)
        vm = Vm(self.image, config, restore=_ForkSource(self, spare), backend=self.backend, console=console,
                on_report=on_report)
        vm.forked_from = self
        self._give(vm, work)
        if spare:
            self._spares.request(_machine_key(config), config)
        return vm

    def reset(self, vm: Vm, work: str = "") -> dict:
        """Put ``vm`` (a fork with dirty logging) back to the zygote point in
        place; what it cost, step by step (``vmm bench`` reports it)."""
        if getattr(vm, "forked_from", None) is not self:
            raise ValueError("only a VM forked from this zygote can be reset to it")
        t0 = time.perf_counter_ns()
        # Written since (and re-armed for the next round), in two: pages the
        # zygote holds data in, copied back, and pages all zero in the
        # zygote, zeroed (a memset moves half the bytes of a copy: the
        # zygote's page is not read; most pages a test writes are fresh
        # frames, zero in the zygote). Dense scattered runs come widened over
        # the clean pages between them (vmm.dirty_log.bitmap_runs).
        runs, zero = vm.dirty_tracker.take_split(self.data_pages)
        t1 = time.perf_counter_ns()
        # And the mailbox: the host wrote the last work there, so that is in
        # no dirty log (the rest of its pages, if the guest wrote them, is
        # restored with the runs). The zygote's bytes over the last work's
        # message and the next one, with the next one in them: one small
        # write instead of the zygote's pages and then the work
        # (WorkMailbox.deliver), ~15 us less right after KVM_RUN.
        box = self._boxes.get((work, vm.work.written))
        if box is None:
            box = self._box_image(vm, work)
        vm.memory.put_back(self.memory, runs, zero, self.mailbox, box[0])
        t2 = time.perf_counter_ns()
        if self._synced is None:  # one answer per host: every fork of this zygote runs here
            self._synced = vm.vm.syncs_regs(K.KVM_SYNC_X86_REGS | K.KVM_SYNC_X86_SREGS | K.KVM_SYNC_X86_EVENTS)
        self._loader.load(vm.vcpu, self._synced)
        t3 = time.perf_counter_ns()
        vm.reset_devices()
        vm.work.delivered(self.mailbox, box[1])
        t4 = time.perf_counter_ns()
        zeroed = sum(n for _first, n in zero)
        return {"pages": sum(n for _first, n in runs) + zeroed, "zeroed": zeroed, "runs": len(runs) + len(zero), "log_us": (t1 - t0) / 1e3, "copy_us": (t2 - t1) / 1e3,
                "vcpu_us": (t3 - t2) / 1e3, "devices_us": (t4 - t3) / 1e3, "total_us": (t4 - t0) / 1e3,
                "mechanism": vm.dirty_mechanism}

    def load_ioctls(self, vm: Vm) -> list:
        """The vCPU ioctls ``reset`` makes to load ``vm``'s state, prepared
        (``vmm bench`` times them alone). After a first reset of ``vm``."""
        return self._loader.ioctls(vm.vcpu, bool(self._synced))

    def _box_image(self, vm: Vm, work: str) -> tuple[bytes, int]:
        """What a reset writes at the mailbox of ``vm`` for ``work``: the
        zygote's bytes over the message the host wrote last (``written``)
        and the next one, with the next one in them. Kept, by work and
        length written before: a test suite resets to a few works, each
        many times. With the length of the message in it."""
        message = vm.work.message(work)
        key = (work, vm.work.written)
        image = bytearray(self.memory.read(self.mailbox, max(len(message), key[1])))
        image[: len(message)] = message
        if len(self._boxes) >= _BOXES_KEPT:
            self._boxes.clear()
        box = self._boxes[key] = (bytes(image), len(message))
        return box

    def _give(self, vm: Vm, work: str) -> None:
        vm.work.mailbox = self.mailbox
        vm.work.give(work)
        vm.work.deliver()

    # --- results as if booted cold ------------------------------------------------------
    def full_result(self, result):
        """A fork's RunResult with the zygote's boot output and reports in
        front, so it reads like one run from the first instruction."""
        timings = {**{k: v for k, v in self.boot_result.timings_ms.items() if k not in ("run",)},
                   "fork_setup": result.timings_ms.get("setup_total", 0.0), "run": result.timings_ms.get("run", 0.0)}
        timings["zygote_boot"] = self.boot_ms  # paid once per zygote, not by this run
        return dataclasses.replace(
            result,
            serial=self.boot_result.serial + result.serial,
            reports=list(self.boot_result.reports) + list(result.reports),
            timings_ms=timings,
        )
