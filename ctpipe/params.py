"""Reading params.yaml: every stage reads only its own section plus ``base``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Return the whole params.yaml as a dict."""
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def stage_params(stage: str, path: str | Path = "params.yaml") -> tuple[dict[str, Any], int]:
    """Return ``(params[stage], params['base']['seed'])``.

    Raises:
        KeyError: naming the missing section, so a typo in params.yaml is caught at once.
    """
    params = load_params(path)
    if stage not in params:
        raise KeyError(f"{path}: no section '{stage}'")
    return params[stage], int(params["base"]["seed"])
