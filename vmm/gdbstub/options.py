"""Options of ``vmm run --gdb`` (light: ``vmm.cli`` adds them to its parser)."""

from __future__ import annotations


def add_run_arguments(p) -> None:
    g = p.add_argument_group("debugging with gdb")
    g.add_argument("--gdb", metavar="PORT|HOST:PORT|unix:PATH",
                   help="serve the guest to gdb (remote serial protocol); TCP listens on 127.0.0.1 unless "
                        "--gdb-allow-remote; a UNIX socket is created mode 0600")
    g.add_argument("--gdb-wait", action="store_true",
                   help="stop before the first guest instruction until gdb continues (like qemu -s -S)")
    g.add_argument("--gdb-allow-remote", action="store_true",
                   help="allow --gdb on a non-loopback address (the stub has no authentication)")
