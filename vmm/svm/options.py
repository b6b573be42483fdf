"""Options of ``vmm svm`` (light: ``vmm.cli`` adds them to its parser)."""

from __future__ import annotations

import argparse
import re


def _memory(text: str) -> str:
    m = re.fullmatch(r"(\d+)([MG])", text.strip().upper())
    if not m or not (512 <= int(m.group(1)) * (1024 if m.group(2) == "G" else 1) <= 16384):
        raise argparse.ArgumentTypeError(f"invalid memory size {text!r} (512M .. 16G, e.g. 4G)")
    return m.group(1) + m.group(2)


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1
    if v <= 0:
        raise argparse.ArgumentTypeError(f"invalid value {text!r} (a positive number)")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory", "-m", type=_memory, default="4G", help="RAM of the QEMU machine (default 4G)")
    p.add_argument("--smp", type=int, choices=range(1, 9), default=1, metavar="N",
                   help="vCPUs of the QEMU machine (default 1: TCG competes with everything else for host cores)")
    p.add_argument("--timeout", "-t", type=_positive, metavar="S", help="kill QEMU after S seconds (exit 124)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached base image")
    p.add_argument("--build-only", action="store_true", help="build (or find) the image, print its path and size, exit")
    p.add_argument("--tests", action="store_true",
                   help="run the SVM pass of the test suite (the kvm tests in SVM_PASS); CMD adds pytest arguments")
    p.add_argument("--verbose", "-v", action="store_true", help="also show the kernel console before and after CMD")
    p.add_argument("--quiet", "-q", action="store_true", help="no timing summary on stderr")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD", help="command to run in the project directory")
