"""``vmm build``: build the guest kernel (cached) and print its path."""

from __future__ import annotations

from ..guest_build import build_guest


def main(args) -> int:
    print(build_guest(force=args.force, quiet=args.quiet))
    return 0
