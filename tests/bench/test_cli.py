"""Options of `vmm bench` and how much each section runs (pure)."""

import argparse

import pytest

from vmm.bench.options import SECTIONS, Plan, parse_only
from vmm.units import parse_sizes
from vmm.cli import build_parser


def test_parse_only_keeps_report_order():
    assert parse_only("scale,boot") == ["boot", "scale"]
    assert parse_only(" exits ") == ["exits"]


@pytest.mark.parametrize("text", ["", "boot,nope", ","])
def test_parse_only_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_only(text)


def test_parse_sizes():
    assert parse_sizes("16M,64G") == [16 << 20, 64 << 30]


def test_wired_into_vmm_cli():
    args = build_parser().parse_args(["bench", "--quick", "--only", "boot,exits", "--runs", "2", "--json", "x.json"])
    assert args.quick and args.runs == 2 and args.only == ["boot", "exits"] and args.json == "x.json"
    args = build_parser().parse_args(["bench"])
    assert args.only == list(SECTIONS) and not args.quick and args.guest_cmdline == "bench=all"


def test_refuses_zero_runs(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--runs", "0"])


def test_quick_plan_is_small():
    quick = Plan.from_args(build_parser().parse_args(["bench", "--quick"]))
    full = Plan.from_args(build_parser().parse_args(["bench"]))
    assert quick.runs < full.runs and quick.exits < full.exits
    assert quick.scale_runs == 1 and quick.guest_boots == 1
    assert Plan.from_args(build_parser().parse_args(["bench", "--quick", "--runs", "2"])).runs == 2


def test_pin_copies_the_kernel(tmp_path):
    from vmm.bench.kernel import KernelChoice, pin

    elf = tmp_path / "kernel"
    elf.write_bytes(b"\x7fELF" + bytes(60))
    pinned = pin(KernelChoice(elf, "given"))
    assert pinned.path != elf and pinned.path.read_bytes() == elf.read_bytes()
    assert pinned.source == elf and len(pinned.sha256) == 64 and pinned.note == "given"
