"""Progress bars: drawn live on a terminal, at most one line a minute where stderr is a file."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from tqdm import tqdm

from ctpipe.progress import LOG_INTERVAL_S, on_terminal, progress

ROOT = Path(__file__).resolve().parents[1]


class _Stream(io.StringIO):
    """A text stream that says whether it is a terminal."""

    def __init__(self, tty: bool):
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def _draws(tty: bool, seconds: int) -> int:
    """How many times a bar is drawn over ``seconds`` of (simulated) time, one step a second."""
    stream = _Stream(tty)
    clock = [0.0]
    bar = progress(total=seconds, file=stream)
    bar._time = lambda: clock[0]  # tqdm's own clock, so the test does not wait ten minutes
    bar.start_t = bar.last_print_t = 0.0
    for _ in range(seconds):
        clock[0] += 1.0
        bar.update()
    bar.close()
    return stream.getvalue().count("\r")  # every draw starts with a carriage return


@pytest.fixture(autouse=True)
def _no_monitor_thread(monkeypatch):
    # tqdm's monitor thread redraws on the real clock; without it the counts are exact
    monkeypatch.setattr(tqdm, "monitor_interval", 0)


def test_off_a_terminal_a_bar_draws_about_once_a_minute():
    draws = _draws(tty=False, seconds=600)
    assert draws <= 600 / LOG_INTERVAL_S + 2  # the first line, one a minute, the last


def test_on_a_terminal_a_bar_redraws_live():
    assert _draws(tty=True, seconds=600) >= 500


def test_stderr_decides_by_default(monkeypatch):
    monkeypatch.setattr("sys.stderr", _Stream(tty=False))
    assert not on_terminal()
    assert progress(range(3)).mininterval == LOG_INTERVAL_S
    monkeypatch.setattr("sys.stderr", _Stream(tty=True))
    assert on_terminal()
    assert progress(range(3)).mininterval < 1


def test_every_bar_goes_through_the_helper():
    users = [
        str(path.relative_to(ROOT))
        for folder in ("ctpipe", "stages", "scripts", "benchmarks")
        for path in (ROOT / folder).rglob("*.py")
        if "import tqdm" in path.read_text() or "from tqdm" in path.read_text()
    ]
    assert users == ["ctpipe/progress.py"]
