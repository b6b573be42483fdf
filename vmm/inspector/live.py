"""The live terminal view: the guest's console beside its memory management.

Refreshes at ``hz`` (default 10): each refresh takes a consistent snapshot
(the vCPU is parked for the walk only), computes the views and shows what
changed since the previous refresh.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.text import Text

from .dirty import DirtyTracker
from .snapshot import RunFilter, take_snapshot
from .views import inspect


class ConsoleTail:
    """Keeps the last lines of the guest's serial output for display."""

    def __init__(self, lines: int = 12):
        self.lines: deque[str] = deque(maxlen=lines)
        self._partial = ""
        self._lock = threading.Lock()

    def feed(self, data: bytes | str) -> None:
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        with self._lock:
            parts = (self._partial + text).split("\n")
            self._partial = parts.pop()
            self.lines.extend(parts)

    def render(self) -> Text:
        with self._lock:
            body = "\n".join([*self.lines, self._partial] if self._partial else self.lines)
        return Text(body)


class LineSink:
    """Console bytes to a stream in whole lines only, so that status lines
    written between them (``line``) never land in the middle of one."""

    def __init__(self, stream):
        self.stream = stream
        self._partial = b""
        self._lock = threading.Lock()

    def feed(self, data: bytes) -> None:
        with self._lock:
            data = self._partial + data
            cut = data.rfind(b"\n") + 1
            self._partial = data[cut:]
            if cut:
                self.stream.write(data[:cut])
                self.stream.flush()

    def line(self, text: str) -> None:
        with self._lock:
            self.stream.write(text.encode() + b"\n")
            self.stream.flush()

    def close(self) -> None:
        with self._lock:
            if self._partial:
                self.stream.write(self._partial)
                self._partial = b""
            self.stream.flush()


class ViewedConsole:
    """The guest console while a full-screen view shows it: kept in a history
    for the view; when the view closes, what it held is written out and the
    console streams as if there had been no view."""

    def __init__(self, stream, history):
        self.stream = stream
        self.history = history
        self.viewing = True
        self._lock = threading.Lock()

    def feed(self, data: bytes) -> None:
        with self._lock:
            if self.viewing:
                self.history.feed(data)
                return
        if self.stream is None:  # -q: no console
            return
        self.stream.write(data)
        if b"\n" in data:
            self.stream.flush()

    def release(self) -> None:
        with self._lock:
            if not self.viewing:
                return
            self.viewing = False
            if self.stream is not None:
                self.stream.write(self.history.text().encode())
                self.stream.flush()


class _NoLive:
    """Stands in for rich.live.Live when the output is not a terminal."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, renderable, refresh: bool = False) -> None:
        pass


def live_view(
    target,
    *,
    console_tail: ConsoleTail | None = None,
    poll_serial: Callable[[], None] | None = None,
    is_running: Callable[[], bool] = lambda: True,
    stop: threading.Event | None = None,
    hz: float = 10.0,
    flt: RunFilter | None = None,
    max_rows: int = 25,
    console: Console | None = None,
    emit: Callable[[str], None] | None = None,
) -> dict:
    """Run the live view until ``stop`` is set or the guest stops; returns stats."""
    stop = stop or threading.Event()
    console = console or Console()
    previous = None
    refreshes, total_changes, refresh_ms = 0, 0, []
    dirty = None
    if getattr(target, "dirty_pages", None) is not None and target.dirty_pages() is not None:
        dirty = DirtyTracker(target.dirty_pages, target.facts().memmap)
    with Live(console=console, auto_refresh=False, transient=False) if console.is_terminal else _NoLive() as live:
        while not stop.is_set() and is_running():
            t0 = time.perf_counter()
            if poll_serial is not None:
                poll_serial()
            try:
                snap = take_snapshot(target)
            except Exception as exc:  # the guest went away mid-snapshot
                live.update(Text(f"inspector: {exc}", style="red"), refresh=True)
                break
            view = inspect(snap, target.physmem, flt=flt, previous=previous)
            previous = snap
            total_changes += len(view.changes or [])
            refreshes += 1
            elapsed = (time.perf_counter() - t0) * 1e3
            refresh_ms.append(elapsed)
            header = Text(
                f"live view: refresh {refreshes} at {hz:g} Hz, {elapsed:.1f} ms to snapshot and render, "
                f"{total_changes} mapping changes seen",
                style="bold cyan",
            )
            parts = [header]
            if console_tail is not None:
                parts.append(Panel(console_tail.render(), title="guest console", border_style="dim"))
            if dirty is not None:
                d = dirty.sample()
                regions = ", ".join(f"{r['type']}@{r['phys_start']:#x}: {r['pages']}" for r in d.per_region[:6])
                parts.append(Text(f"dirty pages: {d.pages} in {d.interval_s * 1e3:.0f} ms "
                                  f"({d.pages_per_s:.0f} pages/s) {regions}", style="magenta"))
            parts.append(view.render(max_rows=max_rows))
            if console.is_terminal:
                live.update(Group(*parts), refresh=True)
            elif refreshes % max(1, round(hz)) == 1 or hz < 1:
                # Not a terminal (a pipe, a log): one summary line a second, not a redraw per refresh.
                s = view.summary_line()
                status = f"inspect: refresh {refreshes}: {s}; {total_changes} mapping changes so far"
                if emit is not None:
                    emit(status)  # between whole console lines
                else:
                    console.print(status, soft_wrap=True)
            stop.wait(max(0.0, 1.0 / hz - (time.perf_counter() - t0)))
    return {"refreshes": refreshes, "changes": total_changes, "refresh_ms": refresh_ms}
