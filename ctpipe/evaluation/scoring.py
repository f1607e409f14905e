"""A split scored the one way evaluate reports it (quantize scores its fp32 and INT8 models alike).

Per case: the voxel metrics of the post-processed mask and the nodule candidates, both from one
labelling of the prediction (the post-processing is applied by the caller, so that evaluation
depends on no post-processing code). Over the split: voxel metrics averaged over the
cases that have nodules (cases without one are judged by the lesion-level figures, their false
positives count in FPs per scan) and the LUNA16 FROC over all scans.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ctpipe.evaluation import luna16, overlap
from ctpipe.geometry import Geometry

log = logging.getLogger(__name__)


@dataclass
class SplitScore:
    per_case: pd.DataFrame  # case_id, seriesuid, nodules, truth_voxels, pred_voxels, voxel metrics
    candidates: pd.DataFrame  # every candidate, with seriesuid and ``detected``
    voxel: dict[str, float]  # voxel metrics averaged over the cases with nodules
    froc: dict  # luna16.froc of the candidates


def score_case(
    case: dict,
    truth: np.ndarray,
    mask: np.ndarray,
    cands: pd.DataFrame,
    geom: Geometry,
    surface_tolerance_mm: float = 1.0,
) -> tuple[dict, pd.DataFrame]:
    """One case's row (voxel metrics of ``mask`` against ``truth``) and its candidates tagged with
    its series; ``mask`` and ``cands`` come from one labelling of the prediction
    (:meth:`ctpipe.postprocessing.candidates.Chosen.find_nodules`)."""
    voxel = overlap.voxel_metrics(mask, truth, geom.spacing[::-1], surface_tolerance_mm)
    row = {
        "case_id": case["case_id"],
        "seriesuid": case["seriesuid"],
        "nodules": int(case["nodules"]),
        "truth_voxels": int(np.count_nonzero(truth)),
        "pred_voxels": int(np.count_nonzero(mask)),
        **voxel,
    }
    return row, cands.assign(seriesuid=case["seriesuid"])


def summarise(
    rows: list[dict],
    candidates: list[pd.DataFrame],
    nodules: pd.DataFrame,
    fp_rates: Sequence[float] = luna16.LUNA16_FP_RATES,
) -> SplitScore:
    """The split's figures from the rows and candidates of :func:`score_case`."""
    per_case = pd.DataFrame(rows)
    cands = pd.concat(candidates, ignore_index=True)
    with_nodules = per_case[per_case["truth_voxels"] > 0]
    if with_nodules.empty:  # e.g. a small test split whose nodules vanished at the plan's spacing
        log.warning(
            "none of the %d cases has nodule voxels: %s are undefined (null)",
            len(per_case),
            ", ".join(overlap.VOXEL_KEYS),
        )
        voxel = {"n_cases": 0, **dict.fromkeys(overlap.VOXEL_KEYS)}
    else:
        voxel = overlap.aggregate(with_nodules[list(overlap.VOXEL_KEYS)].to_dict("records"))
    return SplitScore(per_case, cands, voxel, luna16.froc(cands, nodules, len(rows), fp_rates))
