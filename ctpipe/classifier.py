"""The candidate classifier: a small 3D network that tells nodules from the rest among the
segmentation's candidates, the second stage of the two-stage LUNA16 detector.

A candidate (a component of :func:`ctpipe.postprocessing.candidates.label_candidates`) is seen
through a crop of the preprocessed image centred on it, of fixed size in mm on the plan's grid
(:func:`crop_shape`, :func:`cut_crops`). The network is MONAI's
:class:`~monai.networks.nets.Classifier`; it is trained by the ``classify`` stage on the train
split's candidates and nodules, and its probability is combined with the segmentation's score
(:func:`combine`) into the score that the FROC ranks; how much the classifier weighs is chosen on
the val split (:func:`choose_weight`). The operating point (which candidates are detections and
form the mask) stays the segmentation's: a cut on the combined score chosen on val cost the test
split a detected nodule (docs/results.md), so the classifier ranks and does not yet decide.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.networks.nets import Classifier
from monai.transforms import Compose, RandFlip, RandRotate90

from ctpipe.evaluation import luna16
from ctpipe.geometry import Geometry, world_to_array_index

MARGIN = 2  # voxels stored around a crop on each side: the room of the training shifts
FP_RATES = luna16.LUNA16_FP_RATES


def crop_shape(spacing_xyz: Sequence[float], crop_mm: float) -> tuple[int, int, int]:
    """Voxels ``[k, j, i]`` of a cube of side ``crop_mm`` on a grid of ``spacing_xyz``, each a
    multiple of 4 (the network halves it twice), at least 8."""
    return tuple(max(8, 4 * math.ceil(crop_mm / float(s) / 4)) for s in reversed(list(spacing_xyz)))


def cut_crops(
    image: np.ndarray, geom: Geometry, xyz: np.ndarray, shape: Sequence[int], margin: int = 0
) -> np.ndarray:
    """Crops of ``image`` (``[k, j, i]``) centred on the world points ``xyz`` (``[n, 3]``, mm),
    each ``shape`` grown by ``margin`` voxels on every side, float16 ``[n, k, j, i]``. Outside the
    volume the crop holds the image's lowest value (air after the normalisation)."""
    size = np.asarray(shape, dtype=int) + 2 * margin
    xyz = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)
    out = np.full((len(xyz), *size), np.min(image), dtype=np.float16)
    if not len(xyz):
        return out
    kji = world_to_array_index(xyz, geom)
    inside = np.isfinite(kji).all(axis=1) & (np.abs(kji) < 1e6).all(axis=1)  # else: all air
    low = np.rint(np.where(inside[:, None], kji, -1e6)).astype(int) - size // 2
    for n, start in enumerate(low):
        src = tuple(slice(max(a, 0), min(a + s, d)) for a, s, d in zip(start, size, image.shape))
        dst = tuple(slice(sl.start - a, sl.stop - a) for sl, a in zip(src, start))
        if all(sl.stop > sl.start for sl in src):
            out[(n, *dst)] = image[src]
    return out


def centre(crops: np.ndarray, margin: int = MARGIN) -> np.ndarray:
    """The middle of crops cut with ``margin``: the network's input size."""
    if margin == 0:
        return crops
    return crops[:, margin:-margin, margin:-margin, margin:-margin]


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


def combine(seg_score: np.ndarray, prob: np.ndarray, weight: float) -> np.ndarray:
    """The candidate score: ``seg_score ** (1 - weight) * prob ** weight`` (a weighted geometric
    mean); ``weight`` 0 is the segmentation's score alone, 1 the classifier's alone."""
    seg_score = np.clip(np.asarray(seg_score, dtype=np.float64), 1e-12, 1.0)
    prob = np.clip(np.asarray(prob, dtype=np.float64), 1e-12, 1.0)
    return seg_score ** (1.0 - weight) * prob**weight


def choose_weight(
    cands: pd.DataFrame, nodules: pd.DataFrame, n_scans: int, weights: Sequence[float]
) -> tuple[pd.DataFrame, float]:
    """The weight of :func:`combine` with the highest CPM on ``cands`` (val: ``seg_score`` and
    ``classifier`` columns; ties: the smaller weight); each weight's CPM and the choice."""
    rows = []
    for weight in sorted(set(weights)):
        scored = cands.assign(score=combine(cands["seg_score"], cands["classifier"], weight))
        rows.append({"weight": weight, "cpm": luna16.froc(scored, nodules, n_scans)["cpm"]})
    table = pd.DataFrame(rows)
    if table["cpm"].isna().all():  # no val nodule: nothing to choose by, the segmentation alone
        return table, 0.0
    return table, float(table.loc[table["cpm"].idxmax(), "weight"])  # idxmax: the first on ties


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

    @classmethod
    def load(cls, path: str | Path) -> CandidateClassifier:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        shape = tuple(int(s) for s in ckpt["shape"])
        net = make_net(shape, ckpt["channels"])
        net.load_state_dict(ckpt["state_dict"])
        net.eval()
        return cls(net, shape, float(ckpt["crop_mm"]), float(ckpt["weight"]))
