"""Pin the ctypes mirrors to <linux/kvm.h> (values from the installed header)."""

import ctypes as C

import pytest

from vmm import kvm_abi as K

SIZES = {
    "kvm_run": 2352,
    "kvm_coalesced_mmio_zone": 16,
    "kvm_coalesced_mmio": 24,
    "kvm_coalesced_mmio_ring": 8,
    "kvm_regs": 144,
    "kvm_sregs": 312,
    "kvm_segment": 24,
    "kvm_dtable": 16,
    "kvm_userspace_memory_region": 32,
    "kvm_cpuid2": 8,
    "kvm_cpuid_entry2": 40,
    "kvm_translation": 24,
    "kvm_dirty_log": 16,
    "kvm_clear_dirty_log": 24,
    "kvm_enable_cap": 104,
    "kvm_dirty_gfn": 16,
    "kvm_guest_debug": 72,
    "kvm_msrs": 8,
    "kvm_msr_entry": 16,
    "kvm_debug_exit_arch": 32,
    "kvm_vcpu_events": 64,
    "kvm_debugregs": 128,
    "kvm_xsave": 4096,
    "kvm_xcrs": 392,
    "kvm_mp_state": 4,
}

OFFSETS = [
    ("kvm_run", "immediate_exit", 1),
    ("kvm_run", "exit_reason", 8),
    ("kvm_run", "cr8", 16),
    ("kvm_run", "u", 32),
    ("kvm_run", "kvm_valid_regs", 288),
    ("kvm_run", "s", 304),
    ("kvm_regs", "rip", 128),
    ("kvm_regs", "rflags", 136),
    ("kvm_sregs", "gdt", 192),
    ("kvm_sregs", "cr0", 224),
    ("kvm_sregs", "efer", 264),
    ("kvm_sregs", "apic_base", 272),
    ("kvm_sregs", "interrupt_bitmap", 280),
    ("kvm_translation", "physical_address", 8),
    ("kvm_translation", "valid", 16),
    ("kvm_guest_debug", "arch", 8),
    ("kvm_userspace_memory_region", "userspace_addr", 24),
    ("kvm_vcpu_events", "sipi_vector", 16),
    ("kvm_vcpu_events", "flags", 20),
    ("kvm_vcpu_events", "exception_has_payload", 55),
    ("kvm_vcpu_events", "exception_payload", 56),
    ("kvm_debugregs", "dr7", 40),
    ("kvm_xcrs", "xcrs", 8),
    ("kvm_clear_dirty_log", "num_pages", 4),
    ("kvm_clear_dirty_log", "first_page", 8),
    ("kvm_clear_dirty_log", "dirty_bitmap", 16),
    ("kvm_enable_cap", "args", 8),
    ("kvm_enable_cap", "pad", 40),
    ("kvm_dirty_gfn", "slot", 4),
    ("kvm_dirty_gfn", "offset", 8),
]

IOCTLS = {
    "KVM_GET_API_VERSION": 0xAE00,
    "KVM_REGISTER_COALESCED_MMIO": 0x4010AE67,
    "KVM_COALESCED_MMIO_PAGE_OFFSET": 2,
    "KVM_CAP_COALESCED_PIO": 162,
    "KVM_CREATE_VM": 0xAE01,
    "KVM_CHECK_EXTENSION": 0xAE03,
    "KVM_GET_VCPU_MMAP_SIZE": 0xAE04,
    "KVM_CREATE_VCPU": 0xAE41,
    "KVM_CREATE_IRQCHIP": 0xAE60,
    "KVM_RUN": 0xAE80,
    "KVM_GET_REGS": 0x8090AE81,
    "KVM_SET_REGS": 0x4090AE82,
    "KVM_GET_SREGS": 0x8138AE83,
    "KVM_SET_SREGS": 0x4138AE84,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_GET_SUPPORTED_CPUID": 0xC008AE05,
    "KVM_SET_CPUID2": 0x4008AE90,
    "KVM_TRANSLATE": 0xC018AE85,
    "KVM_GET_DIRTY_LOG": 0x4010AE42,
    "KVM_SET_GUEST_DEBUG": 0x4048AE9B,
    "KVM_GET_MSRS": 0xC008AE88,
    "KVM_SET_MSRS": 0x4008AE89,
    "KVM_SET_TSS_ADDR": 0xAE47,
    "KVM_GET_TSC_KHZ": 0xAEA3,
    "KVM_GET_STATS_FD": 0xAECE,
    "KVM_SET_IDENTITY_MAP_ADDR": 0x4008AE48,
    "KVM_GET_MSR_INDEX_LIST": 0xC004AE02,
    "KVM_GET_VCPU_EVENTS": 0x8040AE9F,
    "KVM_SET_VCPU_EVENTS": 0x4040AEA0,
    "KVM_GET_XSAVE": 0x9000AEA4,
    "KVM_SET_XSAVE": 0x5000AEA5,
    "KVM_GET_XCRS": 0x8188AEA6,
    "KVM_SET_XCRS": 0x4188AEA7,
    "KVM_GET_DEBUGREGS": 0x8080AEA1,
    "KVM_SET_DEBUGREGS": 0x4080AEA2,
    "KVM_GET_MP_STATE": 0x8004AE98,
    "KVM_SET_MP_STATE": 0x4004AE99,
    "KVM_CLEAR_DIRTY_LOG": 0xC018AEC0,
    "KVM_ENABLE_CAP": 0x4068AEA3,
    "KVM_RESET_DIRTY_RINGS": 0xAEC7,
    "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2": 168,
    "KVM_CAP_DIRTY_LOG_RING": 192,
    "KVM_CAP_DIRTY_LOG_RING_ACQ_REL": 223,
    "KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE": 1,
    "KVM_DIRTY_LOG_INITIALLY_SET": 2,
    "KVM_DIRTY_GFN_F_DIRTY": 1,
    "KVM_DIRTY_GFN_F_RESET": 2,
    "KVM_DIRTY_LOG_PAGE_OFFSET": 64,
    "KVM_MP_STATE_RUNNABLE": 0,
    "KVM_MP_STATE_HALTED": 3,
}


@pytest.mark.parametrize("name,size", sorted(SIZES.items()))
def test_struct_sizes(name, size):
    assert C.sizeof(getattr(K, name)) == size


@pytest.mark.parametrize("struct,field,offset", OFFSETS)
def test_field_offsets(struct, field, offset):
    assert getattr(getattr(K, struct), field).offset == offset


@pytest.mark.parametrize("name,value", sorted(IOCTLS.items()))
def test_ioctl_numbers(name, value):
    assert getattr(K, name) == value


def test_exit_union_members_sit_at_offset_32():
    run = K.kvm_run()
    base = C.addressof(run)
    for member in ("io", "mmio", "internal", "fail_entry", "system_event"):
        assert C.addressof(getattr(run.u, member)) - base == 32


def test_flexible_array_helpers():
    assert C.sizeof(K.kvm_cpuid2_with(3)) == 8 + 3 * 40
    assert C.sizeof(K.kvm_msrs_with(2)) == 8 + 2 * 16


def test_mirrors_match_the_installed_header(tmp_path):
    """Compile a probe against <linux/kvm.h> and compare every size and offset
    pinned above with what the C compiler says (skips without gcc or header)."""
    import os
    import shutil
    import subprocess

    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None or not os.path.exists("/usr/include/linux/kvm.h"):
        pytest.skip("no C compiler or no <linux/kvm.h> to compare with")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>", "int main(void) {"]
    for name in SIZES:
        lines.append(f'printf("size {name} %zu\\n", sizeof(struct {name}));')
    for struct, field, _ in OFFSETS:
        member = "u" if field == "u" else field
        if struct == "kvm_run" and field == "u":
            lines.append('printf("off kvm_run u %zu\\n", offsetof(struct kvm_run, io));')
        else:
            lines.append(f'printf("off {struct} {field} %zu\\n", offsetof(struct {struct}, {member}));')
    for name in IOCTLS:
        lines.append(f'printf("ioctl {name} %lu\\n", (unsigned long){name});')
    lines.append("return 0; }")
    src = tmp_path / "probe.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "probe"
    subprocess.run([gcc, "-o", str(exe), str(src)], check=True, capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        kind, *key, value = line.split()
        value = int(value)
        if kind == "size":
            assert C.sizeof(getattr(K, key[0])) == value, line
        elif kind == "off":
            assert getattr(getattr(K, key[0]), key[1]).offset == value, line
        else:
            assert getattr(K, key[0]) == value, line
