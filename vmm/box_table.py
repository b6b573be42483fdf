"""A box-drawn table laid out by hand: what rich's ``Table`` shows, for a
fraction of its cost.

The live view redraws its tables ten times a second, and rich's ``Table``
costs ~5-10 ms of Python each (measuring every cell, wrapping, cropping):
about 20 ms a refresh with the view's four tables, on the watcher's
thread, which on a host without an idle core is CPU the watched guest does
not get. ``BoxTable`` takes cells that are one line each (str, or a rich
``Text`` for its style), sizes each column to its widest cell, and yields
the lines as segments: the same characters as rich's default table
(``box.HEAVY_HEAD``, one space of padding, the title centred above) when
the table fits. Wider than the console, the widest wrappable column is
word-wrapped to fit (rich would shrink every wrappable column a little).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

from rich.console import Console, ConsoleOptions, RenderResult
from rich.segment import Segment
from rich.style import Style
from rich.text import Text

# rich's box.HEAVY_HEAD, row by row: (left, horizontal, between columns, right).
_TOP = ("┏", "━", "┳", "┓")
_HEAD = ("┃", " ", "┃", "┃")
_HEAD_BOTTOM = ("┡", "━", "╇", "┩")
_BODY = ("│", " ", "│", "│")
_BOTTOM = ("└", "─", "┴", "┘")


@dataclass
class _Column:
    header: str
    justify: str = "left"  # "left" or "right"
    no_wrap: bool = False


@dataclass
class BoxTable:
    title: str | None = None
    #: Pad the outer edge of the first and last columns (rich's ``pad_edge``).
    pad_edge: bool = True
    columns: list[_Column] = field(default_factory=list)
    rows: list[list[str | Text]] = field(default_factory=list)

    def add_column(self, header: str, *, justify: str = "left", no_wrap: bool = False) -> None:
        self.columns.append(_Column(header, justify, no_wrap))

    def add_row(self, *cells: str | Text) -> None:
        self.rows.append([c if isinstance(c, (str, Text)) else str(c) for c in cells])

    def _pads(self) -> list[tuple[int, int]]:
        n = len(self.columns)
        return [(0 if k == 0 and not self.pad_edge else 1, 0 if k == n - 1 and not self.pad_edge else 1)
                for k in range(n)]

    def _widths(self, max_width: int) -> list[int]:
        widths = [max([len(c.header)] + [len(_plain(row[k])) for row in self.rows])
                  for k, c in enumerate(self.columns)]
        pads = self._pads()
        total = sum(widths) + sum(a + b for a, b in pads) + len(widths) + 1
        wrappable = [k for k, c in enumerate(self.columns) if not c.no_wrap]
        if total > max_width and wrappable:
            k = max(wrappable, key=lambda i: widths[i])
            widths[k] = max(len(self.columns[k].header), widths[k] - (total - max_width), 8)
        return widths

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        widths = self._widths(options.max_width)
        pads = self._pads()
        spans = [w + a + b for w, (a, b) in zip(widths, pads)]
        table_width = sum(spans) + len(spans) + 1
        line = Segment.line()
        if self.title:
            title = self.title[:table_width]
            left = (table_width - len(title)) // 2
            yield Segment(" " * left)
            yield Segment(title, console.get_style("table.title"))
            yield Segment(" " * (table_width - left - len(title)))
            yield line

        def rule(chars) -> Segment:
            left, across, between, right = chars
            return Segment(left + between.join(across * s for s in spans) + right)

        def cells_row(chars, cells: list[str | Text], style: Style | None) -> list[Segment]:
            edge, between, right = chars[0], chars[2], chars[3]
            columns = []
            for k, cell in enumerate(cells):
                text = _plain(cell)
                columns.append(textwrap.wrap(text, widths[k]) or [""] if len(text) > widths[k] else [text])
            styles = [style if style is not None else _style(console, cell) for cell in cells]
            out = []
            for i in range(max(len(c) for c in columns)):
                # Unstyled stretches are joined into one segment: rich's cost is per segment.
                plain = [edge]
                for k in range(len(cells)):
                    text = columns[k][i] if i < len(columns[k]) else ""
                    fill = widths[k] - len(text)
                    a, b = pads[k]
                    before, after = (a + fill, b) if self.columns[k].justify == "right" else (a, b + fill)
                    plain.append(" " * before)
                    if styles[k] is not None and text:
                        out.append(Segment("".join(plain)))
                        out.append(Segment(text, styles[k]))
                        plain = []
                    else:
                        plain.append(text)
                    plain.append(" " * after + (between if k < len(cells) - 1 else right))
                out.append(Segment("".join(plain)))
                out.append(line)
            return out

        yield rule(_TOP)
        yield line
        yield from cells_row(_HEAD, [c.header for c in self.columns], console.get_style("table.header"))
        yield rule(_HEAD_BOTTOM)
        yield line
        for row in self.rows:
            yield from cells_row(_BODY, row, None)
        yield rule(_BOTTOM)
        yield line


def _plain(cell: str | Text) -> str:
    return cell if isinstance(cell, str) else cell.plain


def _style(console: Console, cell: str | Text) -> Style | None:
    if isinstance(cell, str) or not cell.style:
        return None
    return cell.style if isinstance(cell.style, Style) else console.get_style(cell.style)
