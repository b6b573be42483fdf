"""The vCPU's paging facts decoded from CPUID, for any host (pure)."""

import pytest

from vmm.abi import Backend
from vmm.cpu import CPUID_PAGE1GB, CpuFeatures, cpu_features
from vmm.vm_builder import direct_map_1g


def table(maxphy: int | None, linear: int = 48, gb: bool = False, ext_max: int = 0x8000_0008):
    t = {0x8000_0000: (ext_max, 0, 0, 0), 0x8000_0001: (0, 0, 0, CPUID_PAGE1GB if gb else 0)}
    if maxphy is not None:
        t[0x8000_0008] = (maxphy | linear << 8, 0, 0, 0)
    return t


@pytest.mark.parametrize("bits", [36, 39, 40, 43, 46, 48, 52])
def test_maxphyaddr_from_leaf_80000008(bits):
    assert cpu_features(table(bits)).maxphyaddr == bits


def test_linear_bits_and_1g_pages():
    f = cpu_features(table(46, linear=57, gb=True))
    assert f == CpuFeatures(maxphyaddr=46, linear_bits=57, gbpages=True)
    assert cpu_features(table(46)).gbpages is False


def test_without_leaf_80000008_maxphyaddr_is_36():
    # SDM 4.1.4: a CPU without the leaf has a 36-bit physical address.
    assert cpu_features(table(None, ext_max=0x8000_0001)).maxphyaddr == 36
    assert cpu_features({}).maxphyaddr == 36 and cpu_features({}).gbpages is False


def test_nonsense_width_falls_back_to_the_architectural_limit():
    assert cpu_features(table(0)).maxphyaddr == 52
    assert cpu_features(table(60)).maxphyaddr == 52


@pytest.mark.parametrize("backend", list(Backend))
@pytest.mark.parametrize("gb", [False, True])
def test_direct_map_1g_follows_the_vcpu_cpuid_except_on_pvm(backend, gb):
    # The CPUID the vCPU gets decides, not the host's /proc/cpuinfo; KVM-PVM
    # faults on 1 GiB leaves even with Page1GB set (shared/HOST.md).
    features = cpu_features(table(46, gb=gb))
    assert direct_map_1g(features, backend) is (gb and backend != Backend.PVM)
