#!/usr/bin/env python3
"""Entry point: ``python vmm.py run`` (same as the installed ``vmm`` command)."""

from vmm.cli import entry_point

if __name__ == "__main__":
    entry_point()
