"""The exit-storm guest and the C host baselines (gcc, no KVM)."""

import pytest

from vmm.bench import host_baselines as hb
from vmm.bench.storm import LINK_BASE, storm_code, storm_kernel


def test_storm_kernel_parses():
    image = storm_kernel(1000)
    assert image.entry == LINK_BASE
    assert len(image.segments) == 1
    assert storm_code(1000)[1:5] == (1000).to_bytes(4, "little")


def test_storm_refuses_zero():
    with pytest.raises(ValueError):
        storm_code(0)


needs_gcc = pytest.mark.skipif(hb.compiler() is None, reason="no gcc on PATH")


@needs_gcc
def test_host_bench_malloc_figure_shape():
    fig = hb.malloc_free(64, 2000, 2_600_000.0)
    assert fig["unit"] == "ns" and fig["n"] == 2000
    assert fig["min"] <= fig["p50"] <= fig["p99"] <= fig["max"]


@needs_gcc
def test_host_bench_refuses_bad_mode():
    with pytest.raises(hb.BaselineError):
        hb._run("nonsense")


@needs_gcc
def test_kvm_loop_builds():
    assert hb.kvm_loop().run_storm is not None
