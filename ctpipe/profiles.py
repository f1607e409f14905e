"""Params profiles (``profiles/*.yaml``): sets of params.yaml changes for another kind of data or
hardware, applied as ``dvc exp run --set-param`` arguments by ``scripts/profile.py`` and by
``benchmarks/bench_scale.py --profile``. Not imported by any stage."""

from __future__ import annotations

from pathlib import Path

import yaml

from ctpipe.config import ConfigError


def override(raw: dict, key: str, value: object, source: str = "override") -> None:
    """Set the dotted ``key`` (``train.patch_size``) of a params mapping to ``value``, in place,
    as ``dvc exp run --set-param`` would; the key must exist (a typo is refused, naming it)."""
    *parents, last = key.split(".")
    node = raw
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or last not in node:
        raise ConfigError(f"{source}: no key {key} in params.yaml")
    node[last] = value


def load(path: str | Path) -> dict[str, object]:
    """A params profile (``profiles/*.yaml``): a mapping of dotted keys to values that
    ``scripts/profile.py`` turns into ``dvc exp run --set-param`` arguments."""
    path = Path(path)
    try:
        profile = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    if not isinstance(profile, dict) or not all(isinstance(k, str) for k in profile):
        raise ConfigError(f"{path}: expected a mapping of SECTION.KEY: value")
    return profile
