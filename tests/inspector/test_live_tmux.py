"""The live view in a real terminal: tmux at 80x24, keys sent with send-keys,
the screen read with capture-pane. Also the pure layout (ViewState, compose)
and piped output."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import pytest

from vmm.inspector.tui import SECTIONS, ViewState, compose, parse_keys

ROOT = Path(__file__).resolve().parents[2]
needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (setup.sh installs it)")
STATUS = re.compile(r"(\w+): lines (\d+)-(\d+) of (\d+)")


class _Tmux:
    """One session on a tmux server of its own (``-S`` socket beside the test's
    files): two suites running at once on one machine never share a server or
    a session name."""

    def __init__(self, socket_dir: Path, command: str, width: int = 80, height: int = 24):
        self.tmux = ["tmux", "-S", str(socket_dir / "tmux.sock")]
        self.name = "vmm-test"
        self.gone = None  # set to a callable that says the program has ended
        subprocess.run([*self.tmux, "kill-server"], capture_output=True)  # a retry's leftover
        subprocess.run([*self.tmux, "new-session", "-d", "-s", self.name, "-x", str(width), "-y", str(height),
                        command], check=True)

    def screen(self) -> list[str]:
        out = subprocess.run([*self.tmux, "capture-pane", "-t", self.name, "-p"], capture_output=True, text=True)
        return out.stdout.splitlines()

    def keys(self, *keys: str) -> None:
        subprocess.run([*self.tmux, "send-keys", "-t", self.name, *keys], check=True)

    def wait_for(self, predicate, timeout: float = 60.0, what: str = "") -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if predicate(screen):
                return screen
            if self.gone is not None and self.gone():
                break  # the program is over: the screen will not change any more
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; screen:\n" + "\n".join(self.screen()))

    def press_until(self, key: str, predicate, what: str, tries: int = 6) -> list[str]:
        """Send ``key`` until the screen satisfies ``predicate``: the guest's
        mappings change as it runs, so the list may be momentarily too short to
        scroll when a key arrives."""
        for _ in range(tries):
            self.keys(key)
            try:
                return self.wait_for(predicate, 2.5, what)
            except AssertionError:
                continue
        return self.wait_for(predicate, 1, what)

    def kill(self) -> None:
        subprocess.run([*self.tmux, "kill-server"], capture_output=True)


def _status(screen: list[str]):
    for line in reversed(screen):
        m = STATUS.search(line)
        if m:
            return m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))
    return None


def _rows(screen: list[str]) -> list[str]:
    return [line for line in screen if re.match(r"0x[0-9a-f_]{19} 0x[0-9a-f_]{14}", line)]


class _EndedEarly(Exception):
    """The guest's workload ended before the keys were all sent: too short a budget here."""


def _inspect_session(guest_kernel_path, tmp_path, workload_ms: int) -> None:
    rc_file = tmp_path / "rc"
    rc_file.unlink(missing_ok=True)
    cmd = (f"cd {shlex.quote(str(ROOT))} && PYTHONPATH={shlex.quote(str(ROOT))} {sys.executable} vmm.py run "
           f"--kernel {shlex.quote(str(guest_kernel_path))} --inspect -c 'workload=mm workload_ms={workload_ms}'; "
           f"echo $? > {rc_file}; sleep 120")
    t = _Tmux(tmp_path, cmd)
    t.gone = rc_file.exists
    try:
        try:
            # the workload spawns tasks with stacks: soon more runs than fit at 80x24
            screen = t.wait_for(
                lambda s: len(_rows(s)) >= 5 and _status(s) is not None and _status(s)[3] > _status(s)[2],
                what="page-table rows, more than fit")
            assert len(screen) == 24 and all(len(line) <= 80 for line in screen)
            assert any("direct map" in line for line in _rows(screen)), screen
            assert "flags" in "\n".join(screen) and "guest console" in "\n".join(screen)
            section, first, last, total = _status(screen)
            assert section == "tables" and first == 1 and last - first + 1 == len(_rows(screen))
            top = _rows(screen)[0]
            screen = t.press_until("j", lambda s: (_status(s) or (0, 0))[1] == 2, "j to scroll one line")
            assert _rows(screen)[0] != top and top not in _rows(screen)
            t.press_until("k", lambda s: (_status(s) or (0, 0))[1] == 1 and _rows(s)[0] == top, "k to scroll back")
            t.press_until("NPage", lambda s: (_status(s) or (0, 0))[1] > 1, "PgDn to scroll a page")
            t.keys("Tab")
            t.wait_for(lambda s: (_status(s) or ("",))[0] == "physical" and any("frames allocated" in x for x in s),
                       10, "Tab to the physical-memory section")
            t.keys("1", "/", "s", "t", "a", "c", "k", "Enter")
            t.wait_for(lambda s: _rows(s) and all("stack" in r for r in _rows(s)), 10, "a filter on 'stack'")
            t.keys("?")
            t.wait_for(lambda s: any("close the view" in x for x in s), 10, "the help")
            t.keys("x", "q")  # any key closes the help, q the view
            t.wait_for(lambda s: any(line.startswith("workload: t=") for line in s) and _status(s) is None, 15,
                       "the console after q")
        except AssertionError:
            if rc_file.exists():  # the run is over: it ended while the keys were still being sent
                raise _EndedEarly from None
            raise
        if rc_file.exists():
            raise _EndedEarly  # ... or as q arrived: "goes on without the view" would prove nothing
        # the run goes on without the view and ends as it would have
        deadline = time.monotonic() + 90
        while not rc_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert rc_file.read_text().strip() == "0"
        assert any("guest exited with status 0" in x for x in t.screen())
    finally:
        t.kill()


@needs_tmux
@pytest.mark.kvm
@pytest.mark.slow
def test_run_inspect_at_80x24(guest_kernel_path, tmp_path):
    # The guest's workload must outlast the keys, and the test waits for its
    # end: a short budget first, a long one only where the machine is too
    # slow for it (nothing is weaker for it: the same checks, a longer run).
    for workload_ms in (6000, 30000):
        try:
            _inspect_session(guest_kernel_path, tmp_path, workload_ms)
            return
        except _EndedEarly:
            if workload_ms == 30000:
                raise AssertionError("the guest's 30 s workload ended before the keys were sent") from None


@needs_tmux
@pytest.mark.kvm
@pytest.mark.slow
def test_inspect_socket_grows_with_the_terminal(guest_kernel_path, tmp_path):
    sock = tmp_path / "vm.sock"
    vm = subprocess.Popen([sys.executable, "vmm.py", "run", "--kernel", str(guest_kernel_path), "-q", "-c", "workload=mm",
                           "--control", str(sock)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rc_file = tmp_path / "rc"
    t = None
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert vm.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        cmd = (f"cd {shlex.quote(str(ROOT))} && PYTHONPATH={shlex.quote(str(ROOT))} {sys.executable} vmm.py inspect "
               f"{shlex.quote(str(sock))}; echo $? > {rc_file}; sleep 60")
        t = _Tmux(tmp_path, cmd)
        screen = t.wait_for(lambda s: len(_rows(s)) >= 5 and _status(s) is not None, what="page-table rows")
        small = _status(screen)[2]
        subprocess.run([*t.tmux, "resize-window", "-t", t.name, "-x", "160", "-y", "50"], check=True)
        screen = t.wait_for(lambda s: (_status(s) or (0, 0, 0))[2] > small, 15, "more rows at 160x50")
        assert len(screen) == 50
        t.keys("q")
        deadline = time.monotonic() + 30
        while not rc_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert rc_file.read_text().strip() == "0"
        assert vm.poll() is None  # the VM keeps running after the viewer quits
    finally:
        if t is not None:
            t.kill()
        vm.terminate()
        vm.wait(timeout=30)


@pytest.mark.kvm
def test_piped_inspect_keeps_whole_lines(guest_kernel_path):
    proc = subprocess.run(
        f"{sys.executable} vmm.py run --kernel {shlex.quote(str(guest_kernel_path))} --inspect "
        f"-c 'workload=mm workload_ms=2500' | cat",
        shell=True, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    lines = proc.stdout.splitlines()
    status = [x for x in lines if "inspect: refresh" in x]
    assert status, proc.stdout[-2000:]
    for line in lines:
        if "inspect: refresh" in line:
            assert line.startswith("inspect: refresh"), line  # never in the middle of a console line
        if "workload: t=" in line:
            assert line.startswith("workload: t="), line


# --- pure -------------------------------------------------------------------------------


class _FakeRun:
    def __init__(self, i):
        from mm.addr import PageSize
        from mm.flags import PteFlags

        self.virt, self.phys, self.size = 0xFFFF_8000_0000_0000 + i * 0x1000, i * 0x1000, 0x1000
        self.page_size, self.flags = PageSize.SIZE_4K, PteFlags.PRESENT | PteFlags.WRITABLE


class _FakeView:
    def __init__(self, n):
        self.runs = [(_FakeRun(i), f"label {i}") for i in range(n)]
        self.physical = self.heap = None
        self.findings = []


@pytest.mark.parametrize("width,height", [(80, 24), (160, 50), (40, 12)])
def test_compose_fills_the_terminal_exactly(width, height):
    state = ViewState()
    lines = compose(state, _FakeView(200), [f"console {i}" for i in range(100)], deque(), "header", width, height)
    assert len(lines) == height
    assert all(line.cell_len <= width for line in lines)
    plain = [line.plain for line in lines]
    assert "console 99" in plain[-2]  # the console's last line sits above the status line
    assert STATUS.search(plain[-1])


def test_scrolling_and_sections():
    state = ViewState()
    view = _FakeView(50)
    body = lambda: [x.plain for x in compose(state, view, [], deque(), "h", 80, 24)]  # noqa: E731
    first = body()
    assert "label 0" in first[3]
    for k in parse_keys("jj"):
        state.key(k, 10)
    assert "label 2" in body()[3]
    state.key("end", 10)
    text = body()
    assert "label 49" in "\n".join(text) and STATUS.search(text[-1]).group(4) == "50"
    state.key("\t", 10)
    assert state.name == SECTIONS[1]
    for k in parse_keys("\x1b[Z"):  # Shift-Tab
        state.key(k, 10)
    assert state.name == "tables"
    for k in parse_keys("/label 4\r"):
        state.key(k, 10)
    assert state.filter == "label 4"
    assert {x for x in body() if "label" in x and x.startswith("0x")} == {x for x in body() if "label 4" in x and x.startswith("0x")}
    state.key("q", 10)
    assert state.quit


def test_parse_keys():
    assert parse_keys("j\x1b[A\x1b[6~\tq") == ["j", "up", "pgdn", "\t", "q"]
    assert parse_keys("\x1b") == ["\x1b"]
