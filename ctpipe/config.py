"""The typed form of ``params.yaml``: one pydantic model per section, checked once when a stage
starts. A wrong type, a value out of range or an unknown choice stops the stage with a message that
names the key and the value; a key that is missing or unknown stops it too, so the file and these
models can never drift apart. Stages then pass the section objects (``params.train``,
``params.inference``) to the library; nothing reads the dict again.

What each key means, with its unit, is the comment next to it in ``params.yaml`` (rendered into
``docs/params.md``). Strict types: YAML's ``false`` is a bool and ``"false"`` is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

View = Literal["axial", "coronal", "sagittal"]
Fraction = Field(ge=0.0, le=1.0)
Positive = Field(gt=0)
Pair = Annotated[list[float], Field(min_length=2, max_length=2)]


class ConfigError(ValueError):
    """params.yaml cannot run: the message names the file, the key and the value."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Base(Section):
    seed: int
    workers: int = Field(ge=1)


class Synthetic(Section):
    n_patients: int = Field(ge=1)
    matrix: int = Field(ge=32)
    oblique_degrees: float = Field(ge=0.0, lt=90.0)


class Ingest(Section):
    source: Literal["synthetic", "dicom", "luna16"]
    source_dir: str
    annotations: str | None
    modalities: list[str] = Field(min_length=1)
    min_slices: int = Field(ge=1)
    spacing_tolerance: float = Positive
    uneven_slices: Literal["reject", "resample"]
    synthetic: Synthetic


class Anonymize(Section):
    key_file: str
    retain_modified_dates: bool
    retain_patient_characteristics: bool
    clean_descriptors: bool
    keep_descriptors: list[str]
    retain_device_identity: bool
    retain_safe_private: bool
    keep_linkage: bool
    date_shift_days: Annotated[list[int], Field(min_length=2, max_length=2)]
    burned_in_missing_ok: list[str]

    @model_validator(mode="after")
    def _shift(self) -> Anonymize:
        lo, hi = self.date_shift_days
        if lo > hi or lo <= 0 <= hi:
            raise ValueError(f"date_shift_days {[lo, hi]}: need lo <= hi with 0 outside")
        return self


class Split(Section):
    val_fraction: float = Field(gt=0.0, lt=1.0)
    test_fraction: float = Field(gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _sum(self) -> Split:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must leave cases to train on")
        return self


class Preprocess(Section):
    target_spacing_mm: Literal["auto"] | Annotated[list[float], Field(min_length=3, max_length=3)]
    interpolation: Literal["linear", "bspline"]
    normalization: Literal["window", "percentile"]
    hu_window: Pair
    body_threshold_hu: float
    split: Split


class Train(Section):
    seed: int | None
    context_slices: int = Field(ge=0)
    features: Annotated[list[int], Field(min_length=6, max_length=6)]
    patch_size: int = Field(ge=16, multiple_of=16)
    batch_size: int = Field(ge=1)
    epochs: int = Field(ge=1)
    samples_per_epoch: int = Field(ge=1)
    fg_fraction: float = Fraction
    views: list[View] = Field(min_length=1)
    hard_fraction: float = Fraction
    optimizer: Literal["adamw", "sgd"]
    lr: float = Positive
    weight_decay: float = Field(ge=0.0)
    schedule: Literal["cosine", "poly"]
    ema_decay: float = Field(ge=0.0, lt=1.0)
    num_workers: int = Field(ge=0)
    amp: bool
    compile: bool

    @model_validator(mode="after")
    def _shares(self) -> Train:
        if self.fg_fraction + self.hard_fraction > 1.0:
            raise ValueError("fg_fraction + hard_fraction must be at most 1")
        if len(set(self.views)) != len(self.views):
            raise ValueError(f"views {self.views}: each view at most once")
        # The loader drops the last incomplete batch: an epoch needs one whole batch to step.
        if self.samples_per_epoch < self.batch_size:
            raise ValueError(
                f"samples_per_epoch {self.samples_per_epoch} must hold one batch_size batch "
                f"({self.batch_size})"
            )
        return self


class Inference(Section):
    runtime: Literal["auto", "torch", "onnxruntime"]
    whole_slab: bool
    roi_size: int = Field(ge=16, multiple_of=16)
    overlap: float = Field(ge=0.0, lt=1.0)
    views: list[View] = Field(min_length=1)
    mirror_axes: list[Literal[0, 1]]
    min_candidate_mm3: float = Field(ge=0.0)
    lung_margin_mm: float | None = Field(ge=0.0)


Auto = Literal["auto"]
Probability = Annotated[
    float, Field(gt=0.0, le=1.0)
]  # a threshold: 0 would make every voxel a candidate
Weight = Annotated[float, Field(ge=0.0)]


class Postprocess(Section):
    threshold: Auto | Probability
    threshold_grid: list[Probability] = Field(min_length=1)
    component_threshold: Auto | Probability
    component_threshold_grid: list[Probability] = Field(min_length=1)
    shape_weight: Auto | Weight
    shape_weight_grid: list[Weight] = Field(min_length=1)


class Candidates(Section):
    crop_mm: float = Field(gt=0.0)
    train_views: list[View] = Field(min_length=1)
    train_mirror_axes: list[Literal[0, 1]]


class Classify(Section):
    channels: list[int] = Field(min_length=2)
    epochs: int = Field(ge=1)
    samples_per_epoch: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Positive
    positive_fraction: float = Field(gt=0.0, lt=1.0)
    weight_grid: list[Annotated[float, Fraction]] = Field(min_length=1)
    gain_confidence: float = Field(ge=0.0, le=1.0)


class Malignancy(Section):
    c_grid: list[Annotated[float, Field(gt=0.0)]] = Field(min_length=1)
    gain_confidence: float = Field(ge=0.0, le=1.0)
    bootstrap: int = Field(ge=0)


class Evaluate(Section):
    surface_tolerance_mm: float = Positive
    bootstrap: int = Field(ge=0)


class Quantize(Section):
    schemes: list[Literal["S8S8", "U8S8"]] = Field(min_length=1)
    calibration_methods: list[Literal["minmax", "percentile", "entropy"]] = Field(min_length=1)
    per_channel: bool
    calibration_slabs: int = Field(ge=1)
    sweep_slabs: int = Field(ge=1)
    max_dice_drop: float = Field(ge=0.0)
    selection: Literal["fastest", "accurate"]
    threads: int = Field(ge=0)


class MonitorReference(Section):
    splits: list[Literal["train", "val", "test"]] = Field(min_length=1)


class Export(Section):
    model_name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    atol: float = Positive
    min_dice: float = Fraction
    threads: int = Field(ge=0)
    max_spacing_factor: float = Field(ge=1.0)
    min_extent_mm: float = Field(ge=0.0)
    training_data: str


class Params(Section):
    base: Base
    ingest: Ingest
    anonymize: Anonymize
    preprocess: Preprocess
    train: Train
    inference: Inference
    postprocess: Postprocess
    candidates: Candidates
    classify: Classify
    malignancy: Malignancy
    evaluate: Evaluate
    quantize: Quantize
    monitor_reference: MonitorReference
    export: Export


def _where(error: dict) -> str:
    return ".".join(
        str(part)
        for part in error["loc"]
        if not str(part).startswith(("function-", "literal", "constrained-"))
    )


def validate(raw: object, source: str = "params.yaml") -> Params:
    """Check a params mapping; raise :class:`ConfigError` naming every wrong key and its value."""
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for error in exc.errors(include_url=False):
            value = "" if error["type"] == "missing" else f" (got {error['input']!r})"
            lines.append(f"  {_where(error)}: {error['msg']}{value}")
        raise ConfigError(
            f"{source}: {exc.error_count()} wrong key(s)\n" + "\n".join(lines)
        ) from None


def load(path: str | Path = "params.yaml") -> Params:
    """Read and check ``params.yaml``."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return validate(raw, str(path))
