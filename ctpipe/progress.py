"""Progress bars for every loop that takes a while: the one place that decides how they are drawn.

On a terminal a bar redraws itself in place (tqdm's defaults). Where stderr is a file or a pipe
(``make repro > log 2>&1``, CI), every redraw would stay in the file as another line, hundreds of
kilobytes per run; there a bar writes at most one line a minute, plus its first and last.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from tqdm import tqdm

# Seconds between two lines of a bar written to a file: a long stage still shows it is alive.
LOG_INTERVAL_S = 60.0


def on_terminal(stream=None) -> bool:
    """Whether ``stream`` (default: stderr, where tqdm writes) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress(iterable: Iterable | None = None, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)``, redrawn at most once a minute when its stream is no terminal.

    Callers that update a postfix should pass ``refresh=False`` to ``set_postfix``, which otherwise
    forces a redraw on every call.
    """
    if not on_terminal(kwargs.get("file")):
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        kwargs.setdefault("maxinterval", LOG_INTERVAL_S)
    return tqdm(iterable, **kwargs)
