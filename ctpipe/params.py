"""Reading params.yaml: every stage reads only its own section plus ``base``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Return the whole params.yaml as a dict."""
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def stage_params(
    stage: str, path: str | Path = "params.yaml", shared: tuple[str, ...] = ()
) -> tuple[dict[str, Any], int]:
    """Return ``(params[stage] merged with the shared sections, params['base']['seed'])``.

    ``shared`` names sections several stages read (``inference``); their keys must not repeat a
    key of the stage's own section, so one value can never hide another.

    Raises:
        KeyError: naming the missing section, so a typo in params.yaml is caught at once.
        ValueError: a key appears in both the stage's section and a shared one.
    """
    params = load_params(path)
    for name in (stage, *shared):
        if name not in params:
            raise KeyError(f"{path}: no section '{name}'")
    cfg = dict(params[stage])
    for name in shared:
        clash = set(cfg) & set(params[name])
        if clash:
            raise ValueError(f"{path}: keys {sorted(clash)} are in both '{stage}' and '{name}'")
        cfg.update(params[name])
    return cfg, int(params["base"]["seed"])
