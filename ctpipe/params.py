"""The command line all stages share (params.yaml itself is read by :mod:`ctpipe.config`)."""

from __future__ import annotations

import argparse
import logging
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


def stage_parser(doc: str, stage: str) -> argparse.ArgumentParser:
    """The command line all stages share: the script's docstring as ``--help``, ``--params`` and a
    required ``--metrics`` (no default, so a stage run by hand never overwrites a tracked file)."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--params", default="params.yaml", help="params file (default: %(default)s)"
    )
    parser.add_argument(
        "--metrics",
        type=Path,
        required=True,
        help=f"figures of the run to write (dvc.yaml: metrics/{stage}.json)",
    )
    return parser


def add_model_inputs(
    parser: argparse.ArgumentParser, postprocessing: bool = True, onnx: bool = False
) -> None:
    """``MODEL`` and ``DATA_DIR`` (and ``--postprocessing``, ``--onnx``): what the stages after
    train read."""
    parser.add_argument("model", type=Path, help="trained model (models/model.pt)")
    parser.add_argument("data_dir", type=Path, help="preprocessed dataset (data/processed)")
    if onnx:
        parser.add_argument(
            "--onnx",
            type=Path,
            required=True,
            help="the fp32 ONNX export of MODEL, written by train (models/model.onnx)",
        )
    if postprocessing:
        parser.add_argument(
            "--postprocessing",
            type=Path,
            required=True,
            help="post-processing chosen on validation (models/postprocessing.json)",
        )


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
