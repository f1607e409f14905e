"""The command line all stages share (params.yaml itself is read by :mod:`ctpipe.config`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


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
