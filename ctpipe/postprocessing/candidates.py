"""Nodules from a probability map: connected components as candidates, the mask they keep, detections.

Candidates are reported in world (LPS mm) coordinates with :mod:`ctpipe.geometry`, so they are
comparable with LUNA16 ``annotations.csv`` rows whatever the grid (spacing, direction, origin).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np
import pandas as pd
from scipy import ndimage

from ctpipe.geometry import Geometry, array_index_to_world

CANDIDATE_COLUMNS = [
    "coordX",
    "coordY",
    "coordZ",
    "diameter_mm",
    "score",
    "peak",
    "elongation",
    "volume_mm3",
]


# 26-connectivity: voxels touching at an edge or a corner belong to the same nodule.
CONNECTIVITY_26 = ndimage.generate_binary_structure(3, 3)


def equivalent_diameter_mm(volume_mm3: np.ndarray) -> np.ndarray:
    """Diameter of the sphere with the given volume: ``(6 V / pi) ** (1/3)``."""
    return np.cbrt(6.0 * np.asarray(volume_mm3, dtype=np.float64) / np.pi)


def component_max(values: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """The largest of ``values`` in each labelled component 1..n (``ndimage.maximum``'s result).

    Only the labelled voxels are visited: ``ndimage.maximum`` sorts the whole volume by label,
    which took two thirds of the post-processing sweep.
    """
    where = labels > 0
    out = np.full(n, -np.inf, dtype=np.result_type(values.dtype, np.float32))
    np.maximum.at(out, labels[where] - 1, values[where])
    return out


def segment(prob: np.ndarray, threshold: float, component_threshold: float = 0.0) -> np.ndarray:
    """Nodule mask of a probability map, by hysteresis: voxels ``>= threshold``, in 26-connected
    components whose highest probability reaches ``component_threshold``.

    ``threshold`` sets how far a nodule extends; ``component_threshold`` decides whether a
    component is a nodule at all. A network's boundary voxels are less certain than its centres,
    so a low ``threshold`` recovers the extent that a single cut at 0.5 loses, while the higher
    ``component_threshold`` removes the faint blobs that the low one would add (on vessels,
    mostly). With ``component_threshold <= threshold`` this is plain thresholding.

    Args:
        prob: foreground probability, any shape (2D or 3D; 26-connectivity in 3D).
        threshold: lowest probability of a mask voxel.
        component_threshold: lowest peak probability of a kept component.

    Returns:
        Boolean mask, same shape as ``prob``.
    """
    prob = np.asarray(prob)
    mask = prob >= threshold
    if component_threshold <= threshold or not mask.any():
        return mask
    labels, n = ndimage.label(
        mask, structure=ndimage.generate_binary_structure(prob.ndim, prob.ndim)
    )
    peak = component_max(prob, labels, n)
    keep = np.concatenate([[False], peak >= component_threshold])
    return keep[labels]


def operating_score(threshold: float, component_threshold: float) -> float:
    """The lesion operating point of :func:`segment`: a candidate (a component of
    ``prob >= threshold``) counts as a detection where its ``peak`` reaches this, exactly the
    components the mask keeps."""
    return max(float(threshold), float(component_threshold))


def at_operating_point(
    candidates: pd.DataFrame, threshold: float, component_threshold: float
) -> pd.Series:
    """Which candidates (of :func:`candidates_from_probability`) count as detections: those whose
    ``peak``, not their ranking ``score``, reaches :func:`operating_score`, so that the lesion
    figures describe the components the mask keeps whatever the shape weight."""
    return candidates["peak"] >= operating_score(threshold, component_threshold)


def elongation(labels: np.ndarray, n: int, spacing_kji: np.ndarray) -> np.ndarray:
    """How far each labelled component is from round: ``sqrt(largest / smallest eigenvalue)`` of
    its second-moment matrix in mm, the component taken as a solid of voxel boxes.

    A ball gives 1, a rod of length L and width w about L / w, whatever the orientation or the
    voxel spacing. Each voxel adds its own box moment (spacing**2 / 12 on each axis), so a single
    voxel or a one-slice component has a finite value (a single voxel: the ratio of its sides).

    Args:
        labels: component labels 1..n (0 = background), ``[k, j, i]``.
        n: number of components.
        spacing_kji: voxel size in mm along k, j, i.

    Returns:
        ``float64`` array of length ``n``.
    """
    spacing_kji = np.asarray(spacing_kji, dtype=np.float64).reshape(3)
    where = np.nonzero(labels)
    lab = labels[where]
    count = np.bincount(lab, minlength=n + 1)[1:].astype(np.float64)
    xyz = [w * s for w, s in zip(where, spacing_kji)]
    mean = np.stack([np.bincount(lab, c, n + 1)[1:] for c in xyz], axis=1) / count[:, None]
    cov = np.empty((n, 3, 3))
    for a in range(3):
        for b in range(a, 3):
            moment = np.bincount(lab, xyz[a] * xyz[b], n + 1)[1:] / count - mean[:, a] * mean[:, b]
            cov[:, a, b] = cov[:, b, a] = moment
    cov += np.diag(spacing_kji**2 / 12.0)
    eig = np.linalg.eigvalsh(cov)
    return np.sqrt(eig[:, -1] / np.maximum(eig[:, 0], 1e-12))


def shape_score(peak: np.ndarray, elong: np.ndarray, weight: float) -> np.ndarray:
    """Candidate score: the peak probability with its odds divided by ``elongation ** weight``.

    ``p / (p + (1 - p) * elongation ** weight)``: with ``weight`` 0 it is the peak itself; with
    ``weight`` > 0 a tube (a vessel the network took for a nodule) ranks below a ball of the same
    peak, the shape cue of LUNA16 false-positive reduction. A peak of exactly 1 is first moved to
    the largest float32 below 1, so that saturated candidates are still ordered by shape.
    """
    peak = np.asarray(peak, dtype=np.float64)
    if weight == 0:
        return peak
    p = np.clip(peak, 0.0, np.nextafter(np.float32(1), np.float32(0)).astype(np.float64))
    return p / (p + (1.0 - p) * np.asarray(elong, dtype=np.float64) ** float(weight))


def label_candidates(
    prob: np.ndarray,
    geom: Geometry,
    threshold: float,
    min_volume_mm3: float = 0.0,
    shape_weight: float = 0.0,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Nodule candidates: 26-connected components of ``prob >= threshold``, with their labels.

    This is the one definition of a finding: the mask (:func:`find_nodules`), the operating point,
    the FROC and ``predict``'s ``nodules.csv`` all take their components from here, so two nodules
    joined by a bridge under ``threshold`` are two candidates, as they are two mask components.

    Args:
        prob: foreground probability, numpy ``[k, j, i]`` order, on the grid of ``geom``.
        geom: geometry of that grid.
        threshold: lowest probability that belongs to a candidate; > 0, so that every component
            has a probability-weighted centroid.
        min_volume_mm3: components smaller than this are dropped (from the mask too).
        shape_weight: exponent of the elongation in ``score`` (:func:`shape_score`); 0: the peak.

    Returns:
        The component labels (``int32``, 0 = background, the same shape as ``prob``) and one row
        per kept component, sorted by ``score`` (descending): ``coordX, coordY, coordZ`` (world mm,
        probability-weighted centroid), ``diameter_mm`` (equivalent-sphere diameter), ``score`` (the
        ranking score of the FROC), ``peak`` (highest probability in the component),
        ``elongation`` (:func:`elongation`), ``volume_mm3`` (voxels * voxel volume), ``label``.
    """
    prob = np.asarray(prob)
    if prob.ndim != 3:
        raise ValueError(f"prob must be a 3D [k, j, i] array, got shape {prob.shape}")
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    labels, n = ndimage.label(prob >= threshold, structure=CONNECTIVITY_26)
    if n == 0:
        empty = pd.DataFrame({c: pd.Series(dtype=np.float64) for c in CANDIDATE_COLUMNS})
        return labels, empty.assign(label=pd.Series(dtype=np.int64))
    index = np.arange(1, n + 1)
    weights = prob.astype(np.float64)
    volume = np.bincount(labels.ravel(), minlength=n + 1)[1:] * geom.voxel_volume_mm3
    centroid_kji = np.asarray(ndimage.center_of_mass(weights, labels, index), dtype=np.float64)
    xyz = array_index_to_world(centroid_kji, geom).reshape(-1, 3)
    peak = component_max(weights, labels, n)
    elong = elongation(labels, n, geom.spacing[::-1])
    out = pd.DataFrame(
        {
            "coordX": xyz[:, 0],
            "coordY": xyz[:, 1],
            "coordZ": xyz[:, 2],
            "diameter_mm": equivalent_diameter_mm(volume),
            "score": shape_score(peak, elong, shape_weight),
            "peak": peak,
            "elongation": elong,
            "volume_mm3": volume,
            "label": index,
        }
    )
    out = out[out["volume_mm3"] >= min_volume_mm3]
    return labels, out.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)


def candidates_from_probability(
    prob: np.ndarray,
    geom: Geometry,
    threshold: float,
    min_volume_mm3: float = 0.0,
    shape_weight: float = 0.0,
) -> pd.DataFrame:
    """The candidate table of :func:`label_candidates` (without the labels and their column)."""
    return label_candidates(prob, geom, threshold, min_volume_mm3, shape_weight)[1].drop(
        columns="label"
    )


def mask_of(
    labels: np.ndarray, candidates: pd.DataFrame, threshold: float, component_threshold: float
) -> np.ndarray:
    """The nodule mask: the voxels of the candidates (of :func:`label_candidates` at ``threshold``)
    that :func:`at_operating_point` counts as detections, and nothing else."""
    keep = np.zeros(int(labels.max(initial=0)) + 1, dtype=bool)
    keep[
        candidates.loc[
            at_operating_point(candidates, threshold, component_threshold), "label"
        ].to_numpy(int)
    ] = True
    return keep[labels]


def find_nodules(
    prob: np.ndarray,
    geom: Geometry,
    threshold: float,
    component_threshold: float,
    min_volume_mm3: float = 0.0,
    shape_weight: float = 0.0,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Mask and candidates of one probability map, from one labelling (:func:`label_candidates`).

    Returns the boolean mask (:func:`mask_of`) and every candidate (:func:`label_candidates`,
    without ``label``) with ``detected``: True for the candidates whose components form the mask,
    the detections at the operating point. Each mask component is exactly one detected row.
    """
    labels, cands = label_candidates(prob, geom, threshold, min_volume_mm3, shape_weight)
    mask = mask_of(labels, cands, threshold, component_threshold)
    detected = at_operating_point(cands, threshold, component_threshold)
    return mask, cands.drop(columns="label").assign(detected=detected.to_numpy(bool))


# The large-component rule, deleted (commit 8e68312 has it): files written before may name it.
REMOVED_KEYS = ("keep_level", "keep_volume_mm3")


@dataclass(frozen=True)
class Chosen:
    """The post-processing chosen on validation (:mod:`ctpipe.postprocessing.choose`, written to
    ``models/postprocessing.json``): the three values that turn a probability map into nodules.

    Attributes:
        threshold: lowest probability of a mask voxel; candidates are the components at it.
        component_threshold: lowest peak probability of a component kept in the mask (a detection).
        shape_weight: exponent of the elongation in a candidate's score (:func:`shape_score`).
    """

    threshold: float
    component_threshold: float
    shape_weight: float

    def __post_init__(self) -> None:
        for name, ok, bound in (
            ("threshold", lambda v: 0 < v <= 1, "in (0, 1]"),
            ("component_threshold", lambda v: 0 <= v <= 1, "in [0, 1]"),
            ("shape_weight", lambda v: v >= 0, ">= 0"),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
                raise ValueError(f"{name}: {value!r} is not a number {bound}")
            object.__setattr__(self, name, float(value))

    @classmethod
    def from_mapping(cls, values: Mapping[str, object], source: str) -> Chosen:
        """The values of ``values`` (``chosen`` of a ``postprocessing.json``, ``postprocessing`` of
        a package's ``input_spec.json``); other keys are ignored, ``source`` names it in errors.

        Files written before the large-component rule was deleted hold ``keep_level`` and
        ``keep_volume_mm3``: null (the rule off) is ignored, a value is refused, since nodules
        found without the rule would not be those the figures were measured with.
        """
        rule = {k: values[k] for k in REMOVED_KEYS if values.get(k) is not None}
        if rule:
            raise ValueError(
                f"{source}: {rule} turns on the large-component rule, which ctpipe no longer has "
                "(commit 8e68312 does); choose the post-processing again without it"
            )
        missing = [f.name for f in fields(cls) if f.name not in values]
        if missing:
            raise ValueError(f"{source} lacks {missing}")
        try:
            return cls(**{f.name: values[f.name] for f in fields(cls)})
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None

    def find_nodules(
        self, prob: np.ndarray, geom: Geometry, min_volume_mm3: float
    ) -> tuple[np.ndarray, pd.DataFrame]:
        """Mask and candidates of ``prob`` under these values (:func:`find_nodules`)."""
        return find_nodules(
            prob, geom, self.threshold, self.component_threshold, min_volume_mm3, self.shape_weight
        )
