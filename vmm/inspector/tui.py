"""The interactive live view: fits any terminal from 80x24 up, one section at a time.

Layout, top to bottom (every line cropped to the terminal's width, the whole
screen exactly its height, recomputed at each refresh so a resize just works):

    header      refresh count, CR3, RIP, KASLR slide, audit verdict
    tab bar     tables | physical | heap | dirty | audits | console, and the filter
    body        the selected section, scrollable; fills whatever room is left
    console     the guest's last serial lines (a quarter of the screen at most)
    status      position in the section and the keys

Keys: Tab / Shift-Tab or 1-6 switch sections; Up/Down or k/j scroll a line,
PgUp/PgDn (or b/space) a page, Home/End (g/G) to the ends; / edits a filter
(matched against the section's lines; Enter keeps it, Esc clears it); ? shows
the keys; q closes the view.

The screen is text laid out here rather than rich tables, so that the column
widths are known and a row is never wrapped: rows are what scroll.
"""

from __future__ import annotations

import os
import select
import sys
import termios
import threading
import time
import tty
from collections import deque
from dataclasses import dataclass, field

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from ..render import flags_str
from ..units import hex_addr, human_size
from .dirty import DirtyTracker
from .snapshot import take_snapshot
from .views import inspect

SECTIONS = ("tables", "physical", "heap", "dirty", "audits", "console")
HELP = [
    "keys",
    "  Tab, Shift-Tab, 1-6   switch section (tables physical heap dirty audits console)",
    "  Up/Down, k/j          scroll one line",
    "  PgUp/PgDn, b/space    scroll one page",
    "  Home/End, g/G         first / last line",
    "  /                     filter the section's lines (Enter keeps it, Esc clears it)",
    "  q                     close the view (the guest keeps running)",
    "  ?                     this help (any key closes it)",
]
MIN_WIDTH, MIN_HEIGHT = 40, 12


@dataclass
class ViewState:
    """What the user has chosen: section, scroll positions, filter, help."""

    section: int = 0
    scroll: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SECTIONS})
    filter: str = ""
    editing: str | None = None  # the filter being typed, or None
    help: bool = False
    quit: bool = False
    follow_console: bool = True  # the console section sticks to its end until scrolled up
    # the last scroll position that showed a full screen, per section (set by compose):
    # keys clamp to it, while a section that shrinks for a moment keeps the user's place
    max_scroll: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SECTIONS})

    @property
    def name(self) -> str:
        return SECTIONS[self.section]

    def key(self, k: str, page: int) -> None:
        """Apply one key (as returned by ``read_keys``)."""
        if self.editing is not None:
            if k in ("\r", "\n"):
                self.filter, self.editing = self.editing, None
                self.scroll[self.name] = 0
            elif k == "\x1b":
                self.filter, self.editing = "", None
            elif k in ("\x7f", "\b"):
                self.editing = self.editing[:-1]
            elif len(k) == 1 and k.isprintable():
                self.editing += k
            return
        if self.help:
            self.help = False
            return
        name = self.name
        if k == "q":
            self.quit = True
        elif k == "?":
            self.help = True
        elif k in ("\t", "right", "l"):
            self.section = (self.section + 1) % len(SECTIONS)
        elif k in ("shift-tab", "left", "h"):
            self.section = (self.section - 1) % len(SECTIONS)
        elif k in "123456" and len(k) == 1:
            self.section = int(k) - 1
        elif k in ("down", "j"):
            self.scroll[name] += 1
        elif k in ("up", "k"):
            self.scroll[name] -= 1
        elif k in ("pgdn", " ", "ctrl-f"):
            self.scroll[name] += page
        elif k in ("pgup", "b", "ctrl-b"):
            self.scroll[name] -= page
        elif k in ("home", "g"):
            self.scroll[name] = 0
        elif k in ("end", "G"):
            self.scroll[name] = 1 << 30
        elif k == "/":
            self.editing = self.filter
        elif k == "\x1b":
            self.filter = ""
        self.scroll[name] = min(max(0, self.scroll[name]), self.max_scroll[name])
        if name == "console" and k in ("up", "k", "pgup", "b", "ctrl-b", "home", "g"):
            self.follow_console = False
        if name == "console" and k in ("end", "G"):
            self.follow_console = True


_ESCAPES = {
    "\x1b[A": "up", "\x1b[B": "down", "\x1b[C": "right", "\x1b[D": "left", "\x1b[5~": "pgup", "\x1b[6~": "pgdn",
    "\x1b[H": "home", "\x1b[F": "end", "\x1b[1~": "home", "\x1b[4~": "end", "\x1b[Z": "shift-tab",
    "\x1bOA": "up", "\x1bOB": "down", "\x1bOH": "home", "\x1bOF": "end", "\x06": "ctrl-f", "\x02": "ctrl-b",
}


def parse_keys(data: str) -> list[str]:
    """Split raw terminal input into keys (escape sequences to names)."""
    keys, i = [], 0
    while i < len(data):
        if data[i] == "\x1b":
            for seq, name in _ESCAPES.items():
                if data.startswith(seq, i):
                    keys.append(name)
                    i += len(seq)
                    break
            else:
                keys.append("\x1b")
                i += 1
            continue
        keys.append(_ESCAPES.get(data[i], data[i]))
        i += 1
    return keys


class Keyboard:
    """stdin in cbreak mode (keys arrive one by one, Ctrl-C still interrupts),
    restored on close. ``None``-safe: without a terminal it reads nothing."""

    def __init__(self, stream=None):
        self.fd = None
        self.saved = None
        stream = stream if stream is not None else sys.stdin
        try:
            fd = stream.fileno()
        except (AttributeError, ValueError, OSError):
            return
        if not os.isatty(fd):
            return
        self.fd = fd
        self.saved = termios.tcgetattr(fd)
        tty.setcbreak(fd)

    def read(self, timeout: float) -> list[str]:
        if self.fd is None:
            time.sleep(max(0.0, timeout))
            return []
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not ready:
            return []
        data = os.read(self.fd, 1024).decode("utf-8", "replace")
        # an escape sequence may arrive in pieces: give it a moment
        if data.endswith("\x1b") or (data.startswith("\x1b") and len(data) < 3):
            more, _, _ = select.select([self.fd], [], [], 0.02)
            if more:
                data += os.read(self.fd, 64).decode("utf-8", "replace")
        return parse_keys(data)

    def close(self) -> None:
        if self.fd is not None and self.saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
            self.fd = None


# --- the sections' lines ---------------------------------------------------------------------


def table_lines(view, width: int) -> tuple[str, list[str]]:
    """(column header, one line per run) of the page tables, label column taking the rest."""
    # 0xffff_8000_0000_0000 (21) 0x0000_0019_2000 (16) "128 MiB" (7) "2 MiB" (5) "rw-kg" (6): 60 columns,
    # the label takes the rest (20 at 80 columns).
    head = f"{'virtual':<21} {'physical':<16} {'size':>7} {'page':>5} {'flags':<6} what"
    rows = []
    for run, label in view.runs:
        rows.append(f"{hex_addr(run.virt):<21} {hex_addr(run.phys, 12):<16} {human_size(run.size):>7} "
                    f"{human_size(run.page_size):>5} {flags_str(run.flags):<6} {label}")
    return head, rows


def physical_lines(view) -> tuple[str, list[str]]:
    p = view.physical
    if p is None:
        return "", ["the guest did not report its frame bitmap"]
    rows = [f"{p.allocated} frames allocated, {p.free} free, {p.leaked_frames} unreachable", ""]
    rows.append(f"{'region':<22} {'start':<14} {'frames':>8} {'alloc':>8} {'free':>8}")
    for r in p.regions:
        rows.append(f"{str(r['type'])[:22]:<22} {hex_addr(r['phys_start'], 12):<14} {r['frames']:>8} "
                    f"{r['allocated']:>8} {r['free']:>8}")
    rows += ["", "frames by owner"]
    for name, n in p.owner_counts().items():
        rows.append(f"  {name:<22} {n:>8}  {human_size(n * 4096):>8}")
    return "", rows


def heap_lines(view) -> tuple[str, list[str]]:
    h = view.heap
    if h is None:
        return "", ["the guest did not report its heap"]
    rows = [f"heap [{h.heap_start:#x}, {h.heap_end:#x}): {h.free_blocks} free blocks, {human_size(h.free_bytes)} free,",
            f"largest {human_size(h.largest_free)}, fragmentation {h.fragmentation:.0%}"]
    rows += [f"  finding: {f}" for f in h.findings]
    rows += ["", f"{'free block':<18} {'size':>10}"]
    rows += [f"{hex_addr(a):<18} {human_size(s):>10}" for a, s in h.blocks]
    return "", rows


def audit_lines(view) -> tuple[str, list[str]]:
    if not view.findings:
        return "", ["no findings: no W+X, no user page in the kernel half, guard pages unmapped"]
    return f"{'severity':<8} {'kind':<22} {'where':<18} detail", [
        f"{f.severity.name:<8} {f.kind[:22]:<22} {hex_addr(f.virt) if f.virt is not None else '':<18} {f.detail}"
        for f in view.findings
    ]


def dirty_lines(history: deque) -> tuple[str, list[str]]:
    if not history:
        return "", ["dirty logging is off for this VM"]
    rows = []
    for t, d in reversed(history):
        regions = ", ".join(f"{r['type']}@{r['phys_start']:#x}: {r['pages']}" for r in d.per_region[:4])
        rows.append(f"{t:>7.1f} s  {d.pages:>6} pages in {d.interval_s * 1e3:4.0f} ms "
                    f"({d.pages_per_s:>8.0f}/s)  {regions}")
    return f"{'at':>9}  {'pages written since the previous sample (newest first)'}", rows


# --- the screen --------------------------------------------------------------------------------


def compose(state: ViewState, view, console_lines: list[str], dirty_history: deque, header: str,
            width: int, height: int) -> list[Text]:
    """Exactly ``height`` lines of at most ``width`` cells for the current state."""
    width, height = max(width, MIN_WIDTH), max(height, MIN_HEIGHT)
    out: list[Text] = []

    def line(text: str, style: str = "") -> None:
        t = Text(text[:width], style=style, no_wrap=True, overflow="crop")
        out.append(t)

    line(header, "bold cyan")
    tabs = Text(no_wrap=True, overflow="crop")
    for i, name in enumerate(SECTIONS):
        tabs.append(f" {i + 1}:{name} ", style="reverse bold" if i == state.section else "")
    if state.editing is not None:
        tabs.append(f"  /{state.editing}_", style="bold yellow")
    elif state.filter:
        tabs.append(f"  filter: {state.filter}", style="yellow")
    tabs.truncate(width)
    out.append(tabs)

    # The console box: the last lines, a quarter of the screen at most (3 at least).
    show_console = state.name != "console"
    con_n = max(3, (height - 6) // 4) if show_console else 0
    body_h = height - 2 - 1 - (con_n + 1 if show_console else 0)  # header, tabs, status, console title
    if state.help:
        lines = HELP
        head = ""
    elif state.name == "tables":
        head, lines = table_lines(view, width)
    elif state.name == "physical":
        head, lines = physical_lines(view)
    elif state.name == "heap":
        head, lines = heap_lines(view)
    elif state.name == "dirty":
        head, lines = dirty_lines(dirty_history)
    elif state.name == "audits":
        head, lines = audit_lines(view)
    else:
        head, lines = "", list(console_lines)
    if state.filter and not state.help:
        needle = state.filter.lower()
        lines = [ln for ln in lines if needle in ln.lower()]
    if head:
        line(head, "bold")
        body_h -= 1
    body_h = max(1, body_h)
    top_max = max(0, len(lines) - body_h)
    name = state.name
    if not state.help:
        state.max_scroll[name] = top_max
    if name == "console" and state.follow_console:
        state.scroll[name] = top_max
    top = 0 if state.help else min(max(0, state.scroll[name]), top_max)
    shown = lines[top : top + body_h]
    for ln in shown:
        line(ln)
    for _ in range(body_h - len(shown)):
        line("")
    if show_console:
        line(f"-- guest console (last {con_n} lines; 6 for all) " + "-" * width, "dim")
        tail = console_lines[-con_n:]
        for ln in [""] * (con_n - len(tail)) + tail:
            line(ln)
    pos = f"{name}: lines {top + 1 if lines else 0}-{top + len(shown)} of {len(lines)}"
    line(f"{pos}  |  Tab section  j/k PgUp/PgDn scroll  / filter  ? help  q quit", "reverse")
    return out[:height]


def terminal_size(console: Console) -> tuple[int, int]:
    """The terminal's size now (it may have been resized). Asked of the tty
    itself: COLUMNS/LINES in the environment (which rich prefers) are often
    stale copies taken when a shell or multiplexer started."""
    for stream in (sys.stdout, sys.stdin, sys.stderr):
        try:
            size = os.get_terminal_size(stream.fileno())
            return size.columns, size.lines
        except (AttributeError, ValueError, OSError):
            continue
    return console.size


class ConsoleHistory:
    """The guest's serial output as lines (the last ``keep``), fed from any thread."""

    def __init__(self, keep: int = 5000):
        self.lines: deque[str] = deque(maxlen=keep)
        self._partial = ""
        self._lock = threading.Lock()

    def feed(self, data: bytes | str) -> None:
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        with self._lock:
            parts = (self._partial + text.replace("\r", "")).split("\n")
            self._partial = parts.pop()
            self.lines.extend(parts)

    def text(self) -> str:
        """The kept output as it came (the last line may be unfinished)."""
        with self._lock:
            return "".join(line + "\n" for line in self.lines) + self._partial

    def snapshot(self) -> list[str]:
        with self._lock:
            return [*self.lines, self._partial] if self._partial else list(self.lines)


def run_tui(target, *, history: ConsoleHistory, poll_serial=None, is_running=lambda: True,
            stop: threading.Event | None = None, hz: float = 10.0, flt=None, console: Console | None = None,
            keyboard: Keyboard | None = None) -> dict:
    """The interactive view until q, ``stop`` or the guest stops; returns stats."""
    stop = stop or threading.Event()
    console = console or Console()
    state = ViewState()
    dirty = None
    dirty_history: deque = deque(maxlen=600)
    t_start = time.monotonic()
    if getattr(target, "dirty_pages", None) is not None and target.dirty_pages() is not None:
        dirty = DirtyTracker(target.dirty_pages, target.facts().memmap)
    keyboard = keyboard or Keyboard()
    previous = view = None
    refreshes = changes = 0
    next_snapshot = 0.0
    try:
        with Live(console=console, auto_refresh=False, screen=True, transient=True) as live:
            while not stop.is_set() and not state.quit and is_running():
                now = time.monotonic()
                if now >= next_snapshot:
                    next_snapshot = now + 1.0 / hz
                    if poll_serial is not None:
                        poll_serial()
                    try:
                        snap = take_snapshot(target)
                    except Exception as exc:  # the guest went away mid-snapshot
                        if not is_running():
                            break
                        raise RuntimeError(f"inspector: {exc}") from exc
                    t0 = time.perf_counter()
                    view = inspect(snap, target.physmem, flt=flt, previous=previous)
                    previous = snap
                    changes += len(view.changes or [])
                    refreshes += 1
                    if dirty is not None:
                        dirty_history.append((now - t_start, dirty.sample()))
                    render_ms = (time.perf_counter() - t0) * 1e3
                width, height = terminal_size(console)
                console.size = (width, height)
                r = view.snapshot.registers
                errors = sum(1 for f in view.findings if f.severity.name == "ERROR")
                header = (f"vmm live #{refreshes} | RIP {r.rip:#x} | {len(view.runs)} runs | "
                          f"{errors} audit errors | {changes} changes | CR3 {r.cr3:#x} | slide "
                          f"{view.snapshot.facts.kaslr_slide:#x} | {hz:g} Hz, {render_ms:.0f} ms")
                page = max(1, height - 10)
                lines = compose(state, view, history.snapshot(), dirty_history, header, width, height)
                live.update(Group(*lines), refresh=True)
                for k in keyboard.read(min(next_snapshot - time.monotonic(), 0.1)):
                    state.key(k, page)
    finally:
        keyboard.close()
    return {"refreshes": refreshes, "changes": changes, "quit": state.quit}
