"""Malignancy of a found nodule: its label from the readers' ratings, the image figures a model
reads, the model itself (a logistic regression small enough to travel as JSON) and its ROC AUC.

Torch-free: ``stages/malignancy.py`` fits the model, evaluate scores it on the test split and the
exported package (``ctpipe.predict``) runs it on each nodule.

A nodule's figures are read on the preprocessed volume around the segmentation's candidate (its
centre and equivalent diameter ``d``), so that training, evaluation and deployment read the same
thing whatever the annotation said:

- ``log_diameter``: ``ln d`` (mm);
- ``solid_share``: share of the voxels within ``d / 2`` of the centre above ``solid_hu`` (soft
  tissue: 1 for a solid nodule, less with a ground-glass part);
- ``margin_share``: share of the voxels in the shell from ``d / 2`` to ``shell * d / 2`` above
  ``margin_hu``: lobes and spicules reach into it (so do a touching vessel or wall).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ctpipe.annotations import RATINGS
from ctpipe.fileio import read_json, write_json
from ctpipe.geometry import Geometry, world_to_array_index
from ctpipe.intensity import normalise
from ctpipe.postprocessing.crops import cut_crops

FEATURES = ("log_diameter", "solid_share", "margin_share")
SOLID_HU = -300.0  # soft tissue above, ground glass (-750 .. -300) and air below
MARGIN_HU = -500.0  # lobes, spicules, vessels above; aerated lung below
SHELL = 1.5  # outer radius of the margin shell over the nodule's
REACH_MM = 60.0  # figures read no further from the centre (a 30 mm nodule's shell ends at 22.5)


def label(ratings: pd.DataFrame) -> pd.Series:
    """1 where the mean of the given ratings is above 3 (suspicious), 0 where it is not, NA where
    no reader rated the nodule."""
    mean = ratings.astype("Float64").mean(axis=1, skipna=True)
    return (mean > 3).astype("Int64").where(mean.notna())


def labels_of(nodules: pd.DataFrame) -> pd.Series:
    """:func:`label` of each row of a nodules table (NA where it has no ratings)."""
    return label(nodules.reindex(columns=RATINGS))


def features(volume: np.ndarray, geom: Geometry, nodules: pd.DataFrame, norm: dict) -> pd.DataFrame:
    """:data:`FEATURES` of ``nodules`` (``coordX/Y/Z``: centres in world mm; ``diameter_mm``:
    equivalent diameters), on ``volume`` (preprocessed, ``[k, j, i]``, on ``geom``) whose
    intensities ``norm`` normalised; indexed as ``nodules``."""
    xyz = nodules[["coordX", "coordY", "coordZ"]].to_numpy(np.float64).reshape(-1, 3)
    diameter = nodules["diameter_mm"].to_numpy(np.float64).reshape(-1)
    solid, margin = (float(normalise(np.float64(hu), norm)) for hu in (SOLID_HU, MARGIN_HU))
    spacing_kji = np.asarray(geom.spacing, dtype=np.float64)[::-1]
    rows = []
    for centre, d in zip(xyz, diameter):
        radius = max(float(d), 1e-3) / 2
        reach = min(SHELL * radius, REACH_MM) + spacing_kji.max()
        shape = [2 * math.ceil(reach / s) + 1 for s in spacing_kji]
        crop = cut_crops(volume, geom, centre[None], shape)[0].astype(np.float32)
        # mm from the voxel the crop is centred on to every voxel of the crop
        offset = world_to_array_index(centre[None], geom)[0]
        offset = (offset - np.rint(offset)) * spacing_kji if np.isfinite(offset).all() else 0.0
        axes = [(np.arange(n) - n // 2) * s for n, s in zip(shape, spacing_kji)]
        grid = np.meshgrid(*axes, indexing="ij")
        dist = np.sqrt(sum((g - o) ** 2 for g, o in zip(grid, np.broadcast_to(offset, 3))))
        inner = dist <= max(radius, spacing_kji.min() / 2)
        inner.flat[np.argmin(dist)] = True  # at least the centre voxel
        shell = (dist > radius) & (dist <= SHELL * radius + spacing_kji.min() / 2)
        rows.append(
            {
                "log_diameter": math.log(max(float(d), 1e-3)),
                "solid_share": float(np.mean(crop[inner] > solid)),
                "margin_share": float(np.mean(crop[shell] > margin)) if shell.any() else 0.0,
            }
        )
    return pd.DataFrame(rows, columns=list(FEATURES), index=nodules.index)


@dataclass(frozen=True)
class MalignancyModel:
    """``p = sigmoid(intercept + coef . (x - mean) / scale)`` over :data:`FEATURES`."""

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    solid_hu: float = SOLID_HU
    margin_hu: float = MARGIN_HU
    shell: float = SHELL

    def probability(self, table: pd.DataFrame) -> np.ndarray:
        x = table[list(self.features)].to_numpy(np.float64)
        z = (x - np.asarray(self.mean)) / np.asarray(self.scale)
        return 1.0 / (1.0 + np.exp(-(z @ np.asarray(self.coef) + self.intercept)))

    def save(self, path: Path) -> None:
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> MalignancyModel:
        return cls.from_dict(read_json(path), str(path))

    @classmethod
    def from_dict(cls, values: dict, source: str) -> MalignancyModel:
        """The model of ``values`` (as :meth:`save` writes them; ``source`` names them in errors).

        Raises:
            ValueError: other figures or figure settings than this code reads, or a malformed
                model.
        """
        if list(values.get("features", [])) != list(FEATURES):
            raise ValueError(f"{source}: features {values.get('features')}, expected {FEATURES}")
        settings = tuple(values.get(k) for k in ("solid_hu", "margin_hu", "shell"))
        if settings != (SOLID_HU, MARGIN_HU, SHELL):
            raise ValueError(f"{source}: made with other feature settings than this code reads")
        try:
            model = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
            numbers = np.asarray([*model.mean, *model.scale, *model.coef, model.intercept], float)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: not a malignancy model ({err})") from None
        n = len(FEATURES)
        if not (len(model.mean) == len(model.scale) == len(model.coef) == n):
            raise ValueError(f"{source}: {n} means, scales and coefficients expected")
        if not np.isfinite(numbers).all() or min(model.scale) <= 0:
            raise ValueError(f"{source}: non-finite values or a scale <= 0")
        return model


def load_optional(path: Path) -> MalignancyModel | None:
    """The model of ``path``, or None where the malignancy stage fitted none (no ratings)."""
    values = read_json(path)
    return (
        None if values.get("model", True) is None else MalignancyModel.from_dict(values, str(path))
    )


def auc_with_interval(
    truth: np.ndarray,
    scores: dict[str, np.ndarray],
    groups: Sequence[str],
    n_boot: int,
    seed: int,
) -> dict[str, dict]:
    """ROC AUC of each score against ``truth`` and a 95 % bootstrap interval, resampling the
    ``groups`` (the scans: nodules of one scan go together), the same draws for every score;
    ``diff_<name>``: the paired difference of each score but the first to the first."""
    from sklearn.metrics import roc_auc_score

    truth = np.asarray(truth, dtype=int)
    groups = np.asarray(groups)
    names = list(scores)
    out: dict[str, dict] = {}
    if len(np.unique(truth)) < 2:
        return {name: {"auc": None, "lo": None, "hi": None} for name in names}
    point = {name: float(roc_auc_score(truth, s)) for name, s in scores.items()}
    rng = np.random.default_rng(seed)
    ids = np.unique(groups)
    members = [np.flatnonzero(groups == g) for g in ids]
    draws: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(n_boot):
        pick = np.concatenate([members[i] for i in rng.integers(0, len(ids), len(ids))])
        if len(np.unique(truth[pick])) < 2:
            continue
        for name, s in scores.items():
            draws[name].append(float(roc_auc_score(truth[pick], np.asarray(s)[pick])))
    for name in names:
        lo, hi = np.percentile(draws[name], [2.5, 97.5]) if draws[name] else (None, None)
        out[name] = {"auc": point[name], "lo": _num(lo), "hi": _num(hi)}
    first = names[0]
    for name in names[1:]:
        diff = np.asarray(draws[first]) - np.asarray(draws[name])
        lo, hi = np.percentile(diff, [2.5, 97.5]) if len(diff) else (None, None)
        out[f"diff_{name}"] = {
            "auc": point[first] - point[name],
            "lo": _num(lo),
            "hi": _num(hi),
            "share_above": float(np.mean(diff > 0)) if len(diff) else None,
        }
    return out


def _num(value) -> float | None:
    return None if value is None else float(value)


def found_nodules(candidates: pd.DataFrame, nodules: pd.DataFrame) -> pd.DataFrame:
    """Each rated nodule of ``nodules`` that a candidate hits (``nodule_index``, from
    :func:`ctpipe.evaluation.luna16.match_candidates`), with the columns of the hitting candidate
    of the highest ``seg_score`` (else ``score``), its ``label`` and ``annotated_diameter_mm``."""
    labels = labels_of(nodules)
    order = "seg_score" if "seg_score" in candidates.columns else "score"
    hits = candidates[candidates["nodule_index"] >= 0]
    best = hits.sort_values(order, ascending=False, kind="stable").drop_duplicates("nodule_index")
    best = best[best["nodule_index"].map(labels.notna())].sort_values("nodule_index")
    index = best["nodule_index"].to_numpy()
    return best.assign(
        label=labels.to_numpy()[index].astype(int),
        annotated_diameter_mm=nodules["diameter_mm"].to_numpy()[index],
    ).reset_index(drop=True)


def test_report(found: pd.DataFrame, rated: int, n_boot: int, seed: int) -> dict:
    """evaluate.json's malignancy figures: ROC AUC of the model, of the segmentation's diameter
    and of the annotated diameter on the same found nodules, with 95 % intervals and the model's
    paired gain over the segmentation's diameter."""
    scores = {
        "model": found["malignancy"].to_numpy(),
        "diameter": found["diameter_mm"].to_numpy(),
        "annotated_diameter": found["annotated_diameter_mm"].to_numpy(),
    }
    auc = auc_with_interval(
        found["label"].to_numpy(), scores, found["seriesuid"].to_numpy(), n_boot, seed
    )

    def pair(name: str) -> list:
        return [None if v is None else round(v, 4) for v in (auc[name]["lo"], auc[name]["hi"])]

    return {
        "malignancy_auc": auc["model"]["auc"],
        "malignancy_auc_ci95": pair("model"),
        "malignancy_auc_diameter": auc["diameter"]["auc"],
        "malignancy_auc_diameter_ci95": pair("diameter"),
        "malignancy_auc_annotated_diameter": auc["annotated_diameter"]["auc"],
        "malignancy_auc_gain": auc["diff_diameter"]["auc"] if "diff_diameter" in auc else None,
        "malignancy_auc_gain_ci95": pair("diff_diameter") if "diff_diameter" in auc else None,
        "malignancy_nodules": len(found),
        "malignancy_malignant": int(found["label"].sum()),
        "malignancy_missed": rated - len(found),
    }
