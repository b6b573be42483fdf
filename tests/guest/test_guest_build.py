"""The guest kernel builds and its ELF has the layout docs/ABI.md promises.

Builds once per session (the builder caches on a source hash, so this is
cheap after the first run); skipped with the install hint when no suitable
Rust toolchain exists.
"""

from __future__ import annotations

import pytest

from vmm import guest_build

elftools = pytest.importorskip("elftools", reason="pyelftools not installed (pip install pyelftools)")
from elftools.elf.constants import P_FLAGS  # noqa: E402
from elftools.elf.elffile import ELFFile  # noqa: E402
from elftools.elf.relocation import RelocationSection  # noqa: E402

KERNEL_LINK_BASE = 0xFFFF_FFFF_8000_0000
KERNEL_PHYS_BASE = 0x10_0000
PAGE = 4096
R_X86_64_RELATIVE = 8
PF_R, PF_W, PF_X = P_FLAGS.PF_R, P_FLAGS.PF_W, P_FLAGS.PF_X


@pytest.fixture(scope="session")
def kernel_path():
    try:
        return guest_build.build_guest(release=True, quiet=True)
    except guest_build.GuestBuildError as e:
        if str(e) == guest_build.INSTALL_HINT:
            pytest.skip(str(e))
        raise


@pytest.fixture(scope="session")
def elf(kernel_path):
    with open(kernel_path, "rb") as f:
        yield ELFFile(f)


def loads(elf):
    return [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]


def test_header(elf):
    assert elf.elfclass == 64
    assert elf.little_endian
    assert elf["e_machine"] == "EM_X86_64"
    # Static PIE: the host may slide it (guest_build turns GNU ld's ET_EXEC
    # back into ET_DYN).
    assert elf["e_type"] == "ET_DYN"


def test_segments_have_exact_permissions(elf):
    flags = [s["p_flags"] & (PF_R | PF_W | PF_X) for s in loads(elf)]
    assert len(flags) >= 3
    assert flags[:3] == [PF_R | PF_X, PF_R, PF_R | PF_W]
    for f in flags:
        assert not (f & PF_W and f & PF_X), "W+X segment"


def test_segments_page_aligned_and_disjoint(elf):
    segs = loads(elf)
    for s in segs:
        assert s["p_vaddr"] % PAGE == 0 and s["p_paddr"] % PAGE == 0
        assert s["p_align"] == PAGE
        assert s["p_offset"] % PAGE == s["p_vaddr"] % PAGE
    for a, b in zip(segs, segs[1:]):
        assert a["p_vaddr"] + a["p_memsz"] <= b["p_vaddr"]
        assert a["p_paddr"] + a["p_memsz"] <= b["p_paddr"]


def test_linked_in_higher_half_loaded_at_1mib(elf):
    segs = loads(elf)
    assert segs[0]["p_vaddr"] == KERNEL_LINK_BASE
    assert segs[0]["p_paddr"] == KERNEL_PHYS_BASE
    for s in segs:
        assert s["p_vaddr"] >= KERNEL_LINK_BASE
        # One linear offset between virtual and physical for every segment.
        assert s["p_vaddr"] - s["p_paddr"] == KERNEL_LINK_BASE - KERNEL_PHYS_BASE


def test_entry_in_text_segment(elf):
    entry = elf["e_entry"]
    text = [s for s in loads(elf) if s["p_flags"] & PF_X]
    assert len(text) == 1
    assert text[0]["p_vaddr"] <= entry < text[0]["p_vaddr"] + text[0]["p_filesz"]
    sym = elf.get_section_by_name(".symtab").get_symbol_by_name("_start")
    assert sym and sym[0]["st_value"] == entry


def test_only_relative_relocations_inside_image(elf):
    rela = elf.get_section_by_name(".rela.dyn")
    assert isinstance(rela, RelocationSection)
    segs = loads(elf)
    lo, hi = segs[0]["p_vaddr"], max(s["p_vaddr"] + s["p_memsz"] for s in segs)
    relocs = list(rela.iter_relocations())
    assert relocs, "a kernel with vtables/fmt tables must have RELATIVE relocations"
    for r in relocs:
        assert r["r_info_type"] == R_X86_64_RELATIVE
        assert lo <= r["r_offset"] < hi
        assert lo <= r["r_addend"] % (1 << 64) <= hi  # addend is signed in ELF
    # No text relocations: the text segment is never written, not even by the host.
    text = segs[0]
    for r in relocs:
        assert not (text["p_vaddr"] <= r["r_offset"] < text["p_vaddr"] + text["p_memsz"])


def test_dynamic_and_symbols_kept(elf):
    assert any(s["p_type"] == "PT_DYNAMIC" for s in elf.iter_segments())
    symtab = elf.get_section_by_name(".symtab")
    assert symtab is not None, "kernel must not be stripped (host symbolizes RIPs)"
    names = {s.name for s in symtab.iter_symbols()}
    assert {"_start", "_DYNAMIC", "__kernel_start", "__kernel_end"} <= names


def test_no_sse_instructions(kernel_path, elf):
    """SSE at CPL0 kills a KVM-PVM guest: no XMM register may be touched."""
    import shutil
    import subprocess

    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump not installed")
    out = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(kernel_path)], capture_output=True, text=True, check=True).stdout
    bad = [line for line in out.splitlines() if "%xmm" in line or "%ymm" in line or "%zmm" in line]
    assert not bad, "SSE/AVX instructions in the kernel:\n" + "\n".join(bad[:20])


def test_cached_build_is_reused(kernel_path):
    before = kernel_path.stat().st_mtime_ns
    again = guest_build.build_guest(release=True, quiet=True)
    assert again == kernel_path
    assert again.stat().st_mtime_ns == before


def test_mark_pie_rejects_non_elf():
    with pytest.raises(guest_build.GuestBuildError):
        guest_build._mark_pie(bytearray(b"not an elf at all" * 4))
