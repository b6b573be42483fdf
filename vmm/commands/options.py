"""Argument groups several commands share (light: the parser is built from them).

``add_filters`` is also the filter syntax of the gdb stub's ``monitor pt``.
"""

from __future__ import annotations

import argparse

from ..units import parse_page_size, parse_range, parse_size


def add_guest_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel", metavar="PATH", help="ELF64 x86-64 kernel (default: build and use guest/)")
    p.add_argument(
        "--memory", "-m", metavar="SIZE", type=parse_size, default=None,
        help="guest RAM, 16M..64G, a multiple of 4 KiB (default 128M)",
    )


def add_filters(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("filters (combine freely)")
    g.add_argument("--writable", dest="writable", action="store_const", const=True, help="only writable runs")
    g.add_argument("--readonly", dest="writable", action="store_const", const=False, help="only read-only runs")
    g.add_argument("--executable", dest="executable", action="store_const", const=True, help="only executable runs")
    g.add_argument("--nx", dest="executable", action="store_const", const=False, help="only no-execute runs")
    g.add_argument("--user", dest="user", action="store_const", const=True, help="only user-accessible runs")
    g.add_argument("--supervisor", dest="user", action="store_const", const=False, help="only supervisor runs")
    g.add_argument("--kernel-half", dest="kernel_half", action="store_const", const=True, help="only the upper half")
    g.add_argument("--user-half", dest="kernel_half", action="store_const", const=False, help="only the lower half")
    g.add_argument("--page-size", type=parse_page_size, metavar="4K|2M|1G", help="only runs of this page size")
    g.add_argument("--range", type=parse_range, metavar="START:END", help="only runs overlapping this virtual range")
    g.add_argument("--label", metavar="TEXT", help="only runs whose label contains TEXT (heap, stack, text, ...)")
