"""The candidate classifier: a small 3D network that tells nodules from the rest among the
segmentation's candidates, the second stage of the two-stage LUNA16 detector.

A candidate (a component of :func:`ctpipe.postprocessing.candidates.label_candidates`) is seen
through a crop of the preprocessed image centred on it, of fixed size in mm on the plan's grid
(:func:`crop_shape`, :func:`cut_crops`). The network is MONAI's
:class:`~monai.networks.nets.Classifier`; it is trained by the ``classify`` stage on the train
split's candidates and nodules, and its probability is combined with the segmentation's score
(:func:`combine`) into the score that the FROC ranks. How much the classifier weighs is chosen on
the val split, and only a gain beyond the val split's noise counts (:func:`choose_weight`). The
operating point (which candidates are detections and form the mask) stays the segmentation's: a
cut on the combined score chosen on val cost the test split a detected nodule
(docs/postprocessing.md), so the classifier ranks and does not yet decide.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.networks.nets import Classifier
from monai.transforms import Compose, RandFlip, RandRotate90

from ctpipe.evaluation import luna16
from ctpipe.geometry import Geometry
from ctpipe.postprocessing.crops import MARGIN, centre, combine, crop_shape, cut_crops

__all__ = ["MARGIN", "centre", "combine", "crop_shape", "cut_crops"]  # and what is defined here
ONNX_INPUT, ONNX_OUTPUT = "crops", "logit"  # the names in the package's classifier.onnx


def make_net(shape: Sequence[int], channels: Sequence[int]) -> Classifier:
    """MONAI's residual classifier on one-channel crops of ``shape``, one logit out."""
    strides = [2] * (len(channels) - 1) + [1]
    return Classifier(
        in_shape=(1, *shape), classes=1, channels=tuple(channels), strides=strides, dropout=0.2
    )


def augmentations() -> Compose:
    """Flips along every axis and quarter turns in the axial plane: a nodule is a nodule whatever
    its side, a vessel a vessel (MONAI transforms on ``[1, k, j, i]``)."""
    return Compose(
        [
            RandFlip(prob=0.5, spatial_axis=0),
            RandFlip(prob=0.5, spatial_axis=1),
            RandFlip(prob=0.5, spatial_axis=2),
            RandRotate90(prob=0.75, max_k=3, spatial_axes=(1, 2)),
        ]
    )


def random_shift(crops: np.ndarray, rng: np.random.Generator, margin: int = MARGIN) -> np.ndarray:
    """Each crop moved by up to ``margin`` voxels along each axis (the centroid's uncertainty)."""
    if margin == 0:
        return crops
    k, j, i = (s - 2 * margin for s in crops.shape[1:])
    out = np.empty((len(crops), k, j, i), dtype=crops.dtype)
    for n, (a, b, c) in enumerate(rng.integers(0, 2 * margin + 1, size=(len(crops), 3))):
        out[n] = crops[n, a : a + k, b : b + j, c : c + i]
    return out


@torch.no_grad()
def probabilities(net: torch.nn.Module, crops: np.ndarray, batch: int = 256) -> np.ndarray:
    """The network's nodule probability of each crop (``[n, k, j, i]``, the input size)."""
    net.eval()
    out = [
        torch.sigmoid(net(torch.from_numpy(crops[i : i + batch, None].astype(np.float32))))
        .flatten()
        .numpy()
        for i in range(0, len(crops), batch)
    ]
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def choose_weight(
    cands: pd.DataFrame,
    nodules: pd.DataFrame,
    seriesuids: list[str],
    weights: Sequence[float],
    confidence: float,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> tuple[pd.DataFrame, float]:
    """The weight of :func:`combine` chosen on ``cands`` (val: ``seg_score`` and ``classifier``
    columns; ``seriesuids``: every val scan). A weight above 0 is eligible only when its CPM beats
    the segmentation's alone (weight 0) in at least ``confidence`` of the paired bootstrap
    resamples of the scans (:func:`ctpipe.evaluation.luna16.cpm_draws`): a gain within the noise
    of a small val split is not taken. Among the eligible, the highest CPM; ties: the smaller
    weight. Returns each weight's CPM and share of resamples won, and the choice."""

    def scored(weight: float) -> pd.DataFrame:
        return cands.assign(score=combine(cands["seg_score"], cands["classifier"], weight))

    base = luna16.cpm_draws(scored(0.0), nodules, seriesuids, n_bootstrap, seed)
    rows = []
    for weight in sorted(set(weights) | {0.0}):
        cpm = luna16.froc(scored(weight), nodules, len(seriesuids))["cpm"]
        gain = luna16.cpm_draws(scored(weight), nodules, seriesuids, n_bootstrap, seed) - base
        won = float(np.mean(gain[np.isfinite(gain)] > 0)) if np.isfinite(gain).any() else 0.0
        rows.append({"weight": weight, "cpm": cpm, "resamples_won": won if weight else np.nan})
    table = pd.DataFrame(rows)
    eligible = table[(table["weight"] == 0) | (table["resamples_won"] >= confidence)]
    if eligible["cpm"].isna().all():  # no val nodule: nothing to choose by, the segmentation alone
        return table, 0.0
    return table, float(eligible.loc[eligible["cpm"].idxmax(), "weight"])  # the first on ties


@dataclass
class CandidateClassifier:
    """A trained classifier, its crop size and its chosen weight (``models/classifier.pt``)."""

    net: torch.nn.Module
    shape: tuple[int, int, int]
    crop_mm: float
    weight: float

    def rescore(self, image: np.ndarray, geom: Geometry, cands: pd.DataFrame) -> pd.DataFrame:
        """``cands`` (one case's candidates, on ``image``'s grid) with ``seg_score`` (their score
        before), ``classifier`` (the probability) and ``score`` (:func:`combine`), sorted by
        ``score``. Which candidates are detections does not change."""
        xyz = cands[["coordX", "coordY", "coordZ"]].to_numpy(np.float64)
        prob = probabilities(self.net, cut_crops(image, geom, xyz, self.shape))
        out = cands.assign(seg_score=cands["score"], classifier=prob)
        out["score"] = combine(out["seg_score"], prob, self.weight)
        return out.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)

    def save(self, path: Path, channels: Sequence[int], record: dict) -> None:
        torch.save(
            {
                "state_dict": self.net.state_dict(),
                "channels": list(channels),
                "shape": list(self.shape),
                "crop_mm": self.crop_mm,
                "weight": self.weight,
                "record": record,
            },
            path,
        )

    def export_onnx(self, path: Path, opset: int) -> None:
        """The network as one ONNX file: input ``crops`` ``[N, 1, k, j, i]`` float32 (the crop
        shape fixed, the batch free), output ``logit`` ``[N, 1]``."""
        batch = torch.export.Dim("batch", min=1)
        example = torch.zeros((2, 1, *self.shape))
        with torch.no_grad():
            program = torch.onnx.export(
                self.net.eval(),
                (example,),
                input_names=[ONNX_INPUT],
                output_names=[ONNX_OUTPUT],
                dynamo=True,
                opset_version=int(opset),
                dynamic_shapes=({0: batch},),
                external_data=False,
                verbose=False,
            )
        program.model_proto.producer_name = "ctpipe"
        program.save(str(path))

    @classmethod
    def load(cls, path: str | Path) -> CandidateClassifier:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        shape = tuple(int(s) for s in ckpt["shape"])
        net = make_net(shape, ckpt["channels"])
        net.load_state_dict(ckpt["state_dict"])
        net.eval()
        return cls(net, shape, float(ckpt["crop_mm"]), float(ckpt["weight"]))
