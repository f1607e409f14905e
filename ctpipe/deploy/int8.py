"""Choosing and measuring the INT8 model: the quantize stage's work, on the fp32 ONNX graph that
the train stage exported (``models/model.onnx``).

Calibration uses seeded 2.5D slabs of the TRAIN split only. The sweep (schemes x calibration
methods, :mod:`ctpipe.deploy.quant`) is scored on seeded labelled slabs of the VAL split (Dice
pooled over the slabs, each predicted whole), so the test split plays no part in choosing, and
choosing stays cheap. The chosen configuration is then measured against fp32 on the whole TEST
volumes, with the inference of the ``inference`` params (whole slabs by default) but one pass per
view (evaluate's test-time mirroring would take four passes of each model, and mirroring cannot undo
a difference between the two graphs): Dice pooled over all test voxels (the gate), the per-case mean
as evaluate reports it, and CPM. Latency: PyTorch eager, ONNX Runtime fp32 and INT8 on one batch of
validation slabs of ``inference.roi_size`` pixels, warm-up then median and p90.

The constants below say how the figures are measured (how many slabs per batch, how many timed
runs), not what model is made, so they are not params.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ctpipe.config import Inference, Quantize
from ctpipe.deploy import onnx_export, parity, quant, sessions
from ctpipe.evaluation import overlap, scoring
from ctpipe.fileio import atomic_path
from ctpipe.model.data import load_case, load_plan, split_cases
from ctpipe.model.infer import onnx_predictor, predict, torch_predictor
from ctpipe.model.views import lung_roi
from ctpipe.postprocessing.candidates import Chosen
from ctpipe.progress import progress

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 8  # slabs per calibration batch
CALIBRATION_FG_FRACTION = (
    0.33  # share of calibration slabs centred on a nodule voxel (rest anywhere)
)
SWEEP_FG_FRACTION = 0.5  # share of the val sweep slabs centred on a nodule voxel
LATENCY_BATCH = 8  # slabs per sweep batch; the first sweep batch is the one timed
LATENCY_WARMUP = 3  # untimed runs before each timed block
LATENCY_RUNS = 30  # timed runs of each model for the reported median and p90
LATENCY_ROUNDS = 3  # the timed runs come in this many blocks per model, taken in turn
SWEEP_LATENCY_RUNS = 10  # timed runs per scheme in the sweep (for selection: fastest)
SPEEDUP_TARGET = 1.3  # INT8-vs-fp32 speed-up reported as met or not (informative, not a gate)


class GateError(RuntimeError):
    """INT8 accuracy fell below the gate."""


@dataclass
class Slabs:
    """The real slabs quantize works on: calibration batches ``[B, 2c+1, H, W]`` from the train
    split, labelled sweep batches from the val split (the first of them is also the timed batch)."""

    calibration: list[np.ndarray]
    sweep: list[tuple[np.ndarray, np.ndarray]]
    roi_size: int
    seed: int

    @property
    def latency(self) -> np.ndarray:
        return self.sweep[0][0]


def sample_slabs(
    processed: Path, context: int, quantize: Quantize, roi_size: int, seed: int
) -> Slabs:
    """Seeded calibration slabs (train split) and sweep slabs (val split), ``roi_size`` square."""
    calibration = parity.sample_slabs(
        processed,
        "train",
        context,
        [(CALIBRATION_BATCH, roi_size, roi_size)]
        * math.ceil(quantize.calibration_slabs / CALIBRATION_BATCH),
        seed,
        CALIBRATION_FG_FRACTION,
    )
    sweep = parity.sample_patches(
        processed,
        "val",
        context,
        [(LATENCY_BATCH, roi_size, roi_size)] * math.ceil(quantize.sweep_slabs / LATENCY_BATCH),
        seed,
        SWEEP_FG_FRACTION,
    )
    return Slabs(calibration, sweep, roi_size, seed)


def patch_dice(session, patches: list[tuple[np.ndarray, np.ndarray]], threshold: float) -> float:
    """Dice pooled over a set of labelled slabs, each predicted whole in one pass."""
    preds = [
        parity.foreground(session.run(None, {onnx_export.INPUT_NAME: x})[0], threshold)
        for x, _ in patches
    ]
    return overlap.pooled_dice(preds, [label for _, label in patches])


def sweep(
    prepared: Path,
    work: Path,
    slabs: Slabs,
    dice_fp32: float,
    quantize: Quantize,
    threshold: float,
) -> dict[str, dict]:
    """Quantize every configuration and score it on labelled val slabs; time each scheme once.

    The calibration method changes only scales and zero points, never the graph, so all
    configurations of one scheme run the same kernels: one timing per scheme is fairer than six
    short ones that mostly measure the noise of a shared CPU.
    """
    results, scheme_ms = {}, {}
    for method in quantize.calibration_methods:
        ranges = quant.calibrate(
            prepared, slabs.calibration, method, work / f"ranges_{method}.json"
        )
        for scheme in quantize.schemes:
            name = f"{scheme}_{method}"
            path = quant.quantize(
                prepared, work / f"{name}.onnx", ranges, scheme, method, quantize.per_channel
            )
            session = sessions.ort_session(path, quantize.threads)
            if scheme not in scheme_ms:
                scheme_ms[scheme] = quant.latency_ms(
                    lambda s=session: s.run(None, {onnx_export.INPUT_NAME: slabs.latency}),
                    LATENCY_WARMUP,
                    SWEEP_LATENCY_RUNS,
                )["median_ms"]
            dice = patch_dice(session, slabs.sweep, threshold)
            results[name] = {
                "scheme": scheme,
                "method": method,
                "path": path,
                "dice": dice,
                "dice_drop": dice_fp32 - dice,
                "latency_ms": scheme_ms[scheme],
                "passed": dice_fp32 - dice <= quantize.max_dice_drop,
            }
            log.info(
                "%s: val-slab Dice %.4f (drop %+.4f), %.1f ms",
                name,
                dice,
                dice_fp32 - dice,
                scheme_ms[scheme],
            )
    return results


def choose_int8(fp32: Path, int8: Path, slabs: Slabs, quantize: Quantize, threshold: float) -> dict:
    """Calibrate on train slabs, sweep, pick by the gate on val slabs; copy the winner to ``int8``.

    Raises:
        GateError: no configuration keeps the val Dice within ``quantize.max_dice_drop``.
    """
    dice_fp32 = patch_dice(sessions.ort_session(fp32, quantize.threads), slabs.sweep, threshold)
    with tempfile.TemporaryDirectory(dir=int8.parent, prefix=".quantize.") as tmp:
        prepared = quant.prepare(fp32, Path(tmp) / "prepared.onnx")
        configs = sweep(prepared, Path(tmp), slabs, dice_fp32, quantize, threshold)
        winner = quant.select(list(configs.values()), quantize.max_dice_drop, quantize.selection)
        if winner is None:
            raise GateError(
                f"quantize: no configuration keeps the val Dice within {quantize.max_dice_drop} of "
                f"fp32 ({dice_fp32:.4f}): "
                + ", ".join(f"{k} {v['dice']:.4f}" for k, v in configs.items())
            )
        with atomic_path(int8) as tmp_int8:
            shutil.copyfile(winner["path"], tmp_int8)
    return {
        "chosen": {
            "scheme": winner["scheme"],
            "method": winner["method"],
            "selection": quantize.selection,
            "selection_split": "val",
            "selection_slabs": sum(len(x) for x, _ in slabs.sweep),
            "dice_val": winner["dice"],
            "dice_val_fp32": dice_fp32,
        },
        "sweep": {
            k: {key: v[key] for key in ("dice", "dice_drop", "latency_ms", "passed")}
            for k, v in configs.items()
        },
        "calibration": {
            "split": "train",
            "slabs": sum(len(b) for b in slabs.calibration),
            "roi_size": slabs.roi_size,
            "seed": slabs.seed,
        },
    }


class SplitTally:
    """One model's figures over a split, accumulated one case at a time: the rows and candidates
    :mod:`ctpipe.evaluation.scoring` summarises, and the pooled Dice counts."""

    def __init__(self, chosen: Chosen, min_candidate_mm3: float) -> None:
        self.chosen, self.min_candidate_mm3 = chosen, min_candidate_mm3
        self.rows, self.cands = [], []
        self.dice = overlap.PooledDice()

    def add(self, case: dict, prob: np.ndarray, label: np.ndarray, geom) -> np.ndarray:
        """Score one case's probability as evaluate does; return its nodule mask."""
        mask, found = self.chosen.find_nodules(prob, geom, self.min_candidate_mm3)
        row, cands = scoring.score_case(case, label, mask, found, geom)
        self.rows.append(row)
        self.cands.append(cands)
        self.dice.add(mask, label)
        return mask

    def figures(self, nodules: pd.DataFrame) -> dict:
        score = scoring.summarise(self.rows, self.cands, nodules)
        return {
            "dice": self.dice.value,
            "dice_case_mean": score.voxel.get("dice", float("nan")),
            "hd95_mm": score.voxel.get("hd95_mm", float("nan")),
            "cpm": score.froc["cpm"],
        }


def measure_test_split(
    fp32: Path,
    int8: Path,
    processed: Path,
    context: int,
    inference: Inference,
    chosen: Chosen,
    quantize: Quantize,
) -> dict:
    """fp32 and INT8 on the whole test volumes: pooled and per-case Dice, HD95, CPM; the gate.

    One test volume at a time (both models on it, then the next), so memory does not grow with
    the size of the test split.
    """
    test, nodules = split_cases(processed, "test")
    predictors = {
        name: onnx_predictor(sessions.ort_session(path, quantize.threads))
        for name, path in (("fp32", fp32), ("int8", int8))
    }
    tally = {name: SplitTally(chosen, inference.min_candidate_mm3) for name in predictors}
    agree = overlap.PooledDice()  # INT8 against fp32 masks
    plan = load_plan(processed)
    for case in progress(test, desc="test fp32 + int8", unit="case"):
        image, label, geom = load_case(processed, case["case_id"])
        image, label = np.asarray(image, dtype=np.float32), np.asarray(label) > 0
        box = lung_roi(image, plan, geom.spacing[::-1], inference.lung_margin_mm)
        masks = {
            name: tally[name].add(
                case, predict(predictor, image, context, inference, box, mirror=False), label, geom
            )
            for name, predictor in predictors.items()
        }
        agree.add(masks["int8"], masks["fp32"])
        del image, label, masks  # else they stay while the next case is read and predicted
    f, q = (tally[n].figures(nodules) for n in ("fp32", "int8"))
    return {
        "dice_fp32": f["dice"],
        "dice_int8": q["dice"],
        "dice_drop": f["dice"] - q["dice"],
        "dice_int8_vs_fp32": agree.value,
        "dice_case_mean_fp32": f["dice_case_mean"],
        "dice_case_mean_int8": q["dice_case_mean"],
        "hd95_mm_fp32": f["hd95_mm"],
        "hd95_mm_int8": q["hd95_mm"],
        "cpm_fp32": f["cpm"],
        "cpm_int8": q["cpm"],
        "cpm_drop": f["cpm"] - q["cpm"],
        "max_dice_drop": quantize.max_dice_drop,
        "gate_passed": f["dice"] - q["dice"] <= quantize.max_dice_drop,
        "test_cases": len(test),
    }


def dice_definition(test_cases: int, chosen: Chosen) -> str:
    """What ``dice_fp32`` and ``dice_int8`` of :func:`measure_test_split` are pooled over."""
    return (
        f"pooled over all voxels of the {test_cases} test cases, the nodule mask as evaluate makes "
        f"it (probability >= {chosen.threshold}, components peaking >= "
        f"{chosen.component_threshold}), from one pass per view (evaluate also averages "
        "mirrored passes)"
    )


def latencies(
    net: torch.nn.Module, fp32: Path, int8: Path, x: np.ndarray, threads: int
) -> dict[str, dict[str, float]]:
    """Median and p90 milliseconds of PyTorch eager (channels-last), ORT fp32 and ORT INT8 on one
    batch; and under ``load_average_1min`` the 1-minute load average before and after, since
    other processes on a shared CPU change these figures more than anything the stage does."""
    xt = torch.from_numpy(x)
    torch_run = torch_predictor(net)  # channels-last, as evaluate and bench_inference run it
    ort = {n: sessions.ort_session(p, threads) for n, p in (("fp32", fp32), ("int8", int8))}
    runs = {"torch": lambda: torch_run(xt)}
    runs.update({n: (lambda s=s: s.run(None, {onnx_export.INPUT_NAME: x})) for n, s in ort.items()})
    load_before = os.getloadavg()[0]
    with torch.inference_mode():
        out = quant.rotated_latency_ms(runs, LATENCY_WARMUP, LATENCY_RUNS, LATENCY_ROUNDS)
    return {**out, "load_average_1min": [load_before, os.getloadavg()[0]]}


def latency_figures(lat: dict, x: np.ndarray) -> dict:
    """The latency part of ``metrics/quantize.json`` from :func:`latencies`."""
    speedup = lat["fp32"]["median_ms"] / lat["int8"]["median_ms"]
    return {
        **{f"latency_ms_{n}": lat[n]["median_ms"] for n in ("torch", "fp32", "int8")},
        **{f"latency_p90_ms_{n}": lat[n]["p90_ms"] for n in ("torch", "fp32", "int8")},
        "latency_runs": LATENCY_RUNS,
        "latency_input_shape": list(x.shape),
        "speedup_int8_vs_fp32": speedup,
        "speedup_fp32_vs_torch": lat["torch"]["median_ms"] / lat["fp32"]["median_ms"],
        "int8_faster": bool(speedup > 1.0),
        "speedup_target": SPEEDUP_TARGET,
        "speedup_target_met": bool(speedup >= SPEEDUP_TARGET),
    }
