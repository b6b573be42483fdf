"""BoxTable: the same characters as rich's default Table where the table
fits, every word kept where it has to wrap."""

import io

import pytest
from rich.console import Console
from rich.table import Table
from rich.text import Text

from vmm.box_table import BoxTable

ROWS = [
    ("0xffff_8000_0000_0000", "0x0000_0000_0000", "125.83 MiB", "2 MiB", Text("rw-kg", style="bold red"), "direct map"),
    ("0xffff_c800_0b7e_1000", "0x0000_001d_5000", "4 KiB", "4 KiB", "rw-k-", "scratch (tests, workload)"),
    ("...", "", "", "", "", "3 more"),
]
COLUMNS = ("virtual", "physical", "size", "page", "flags", "what")


def _printed(table, width: int = 160) -> str:
    console = Console(file=io.StringIO(), width=width, force_terminal=False)
    console.print(table)
    return console.file.getvalue()


@pytest.mark.parametrize("pad_edge", [True, False])
@pytest.mark.parametrize("title, rows", [
    (None, ROWS), ("page tables (effective flags)", ROWS), ("page tables (effective flags)", []),
    ("a title nearly as wide as the table itself, with its rows, but not wider", ROWS),
])
def test_same_characters_as_rich_when_it_fits(pad_edge, title, rows):
    ours, theirs = BoxTable(title=title, pad_edge=pad_edge), Table(title=title, pad_edge=pad_edge)
    for col in COLUMNS:
        justify = "right" if col in ("size", "page") else "left"
        ours.add_column(col, justify=justify, no_wrap=True)
        theirs.add_column(col, justify=justify, no_wrap=True)
    for row in rows:
        ours.add_row(*row)
        theirs.add_row(*row)
    assert _printed(ours) == _printed(theirs)


def test_a_table_wider_than_the_console_wraps_its_widest_column_and_keeps_every_word():
    detail = " ".join(f"word{i}" for i in range(60))
    t = BoxTable(title="audits: 1 findings")
    for col in ("severity", "kind", "detail"):
        t.add_column(col)
    t.add_row(Text("INFO", style="dim"), "unreachable-allocated", detail)
    out = _printed(t, width=100)
    lines = out.splitlines()
    assert all(len(line) <= 100 for line in lines)
    body = [line for line in lines if line.startswith("│")]
    assert len(body) > 1 and body[0].split("│")[1].strip() == "INFO"
    words = " ".join(line.split("│")[3].strip() for line in body).split()
    assert words == detail.split()
