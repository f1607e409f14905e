"""Stage quantize: ONNX Runtime static INT8 quantization of the trained model, gated on accuracy.

In:  ``MODEL`` (models/model.pt), ``DATA_DIR`` (data/processed), ``--postprocessing``
     (models/postprocessing.json, chosen on validation), params ``quantize``, ``inference`` (ROI,
     overlap, views, smallest candidate; not ``mirror_axes``) and ``base.seed``
Out: ``OUT_DIR`` (models/quantized): ``model_fp32.onnx`` (the shared dynamo export) and
     ``model_int8.onnx`` (QDQ, per-channel weights, after ``quant_pre_process``);
     ``metrics/quantize.json``.

Calibration uses seeded 2.5D slabs of the TRAIN split only. The sweep (schemes x calibration
methods) is scored on seeded labelled slabs of the VAL split (Dice pooled over the slabs, each
predicted whole), so the test split plays no part in choosing, and choosing stays cheap. The
chosen configuration is then measured on the whole TEST volumes, through the same sliding-window
inference as evaluate but one pass per view (evaluate's test-time mirroring would take four passes
of each model, and mirroring cannot undo a difference between the two graphs), against fp32: Dice
pooled over all test voxels (the gate: the stage fails if it drops by more than
``max_dice_drop``), the per-case mean as evaluate reports it, and CPM.
Latency: PyTorch eager, ORT fp32 and ORT INT8 on one fixed batch of validation slabs at the
evaluation ROI size, warm-up then median and p90 over ``latency_runs``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ctpipe.deploy import onnx_export, parity, quant, sessions
from ctpipe.evaluation import overlap, scoring
from ctpipe.fileio import atomic_path, rounded, write_json
from ctpipe.model import data, nets
from ctpipe.model.infer import onnx_predictor, predict_volume, torch_predictor
from ctpipe.model.views import lung_roi
from ctpipe.params import add_model_inputs, setup_logging, stage_params, stage_parser
from ctpipe.postprocessing import choose
from ctpipe.progress import progress
from ctpipe.runenv import cpu_info
from ctpipe.runenv import record as record_environment

log = logging.getLogger("quantize")


class GateError(RuntimeError):
    """INT8 accuracy fell below the gate."""


def patch_dice(session, patches: list[tuple[np.ndarray, np.ndarray]], threshold: float) -> float:
    """Dice pooled over a set of labelled slabs, predicted whole (no sliding window)."""
    preds = [
        parity.foreground(session.run(None, {onnx_export.INPUT_NAME: x})[0], threshold)
        for x, _ in patches
    ]
    return overlap.pooled_dice(preds, [label for _, label in patches])


def sweep(
    prepared: Path,
    work: Path,
    calib: list[np.ndarray],
    patches: list,
    dice_fp32: float,
    x_latency: np.ndarray,
    cfg: dict,
) -> dict[str, dict]:
    """Quantize every configuration and score it on labelled val slabs; time each scheme once.

    The calibration method changes only scales and zero points, never the graph, so all
    configurations of one scheme run the same kernels: one timing per scheme is fairer than six
    short ones that mostly measure the noise of a shared CPU.
    """
    results, scheme_ms = {}, {}
    for method in cfg["calibration_methods"]:
        ranges = quant.calibrate(
            prepared,
            calib,
            method,
            work / f"ranges_{method}.json",
            float(cfg["percentile"]),
            int(cfg["entropy_bins"]),
        )
        for scheme in cfg["schemes"]:
            name = f"{scheme}_{method}"
            path = quant.quantize(
                prepared, work / f"{name}.onnx", ranges, scheme, method, bool(cfg["per_channel"])
            )
            session = sessions.ort_session(path, cfg["threads"], cfg["graph_optimization"])
            if scheme not in scheme_ms:
                scheme_ms[scheme] = quant.latency_ms(
                    lambda s=session: s.run(None, {onnx_export.INPUT_NAME: x_latency}),
                    int(cfg["latency_warmup"]),
                    int(cfg["sweep_latency_runs"]),
                )["median_ms"]
            dice = patch_dice(session, patches, float(cfg["threshold"]))
            results[name] = {
                "scheme": scheme,
                "method": method,
                "path": path,
                "dice": dice,
                "dice_drop": dice_fp32 - dice,
                "latency_ms": scheme_ms[scheme],
                "passed": dice_fp32 - dice <= float(cfg["max_dice_drop"]),
            }
            log.info(
                "%s: val-slab Dice %.4f (drop %+.4f), %.1f ms",
                name,
                dice,
                dice_fp32 - dice,
                scheme_ms[scheme],
            )
    return results


def latencies(net: torch.nn.Module, fp32: Path, int8: Path, x: np.ndarray, cfg: dict) -> dict:
    """Median and p90 milliseconds of PyTorch eager (channels-last), ORT fp32 and ORT INT8 on one batch.

    Also the 1-minute load average before and after, since other processes on a shared CPU
    change these figures more than anything the stage does.
    """
    xt = torch.from_numpy(x)
    torch_run = torch_predictor(net)  # channels-last, as evaluate and bench_inference run it
    ort = {
        n: sessions.ort_session(p, cfg["threads"], cfg["graph_optimization"])
        for n, p in (("fp32", fp32), ("int8", int8))
    }
    runs = {"torch": lambda: torch_run(xt)}
    runs.update({n: (lambda s=s: s.run(None, {onnx_export.INPUT_NAME: x})) for n, s in ort.items()})
    load_before = os.getloadavg()[0]
    with torch.inference_mode():
        out = quant.rotated_latency_ms(
            runs, int(cfg["latency_warmup"]), int(cfg["latency_runs"]), int(cfg["latency_rounds"])
        )
    return {**out, "load_average_1min": [load_before, os.getloadavg()[0]]}


def choose_int8(
    fp32: Path, int8: Path, processed: Path, context: int, cfg: dict, seed: int
) -> dict:
    """Calibrate on train slabs, sweep, pick by the gate on val slabs; copy the winner to ``int8``."""
    roi, batch, threshold = int(cfg["roi_size"]), int(cfg["latency_batch"]), float(cfg["threshold"])
    n_calib = math.ceil(int(cfg["calibration_slabs"]) / int(cfg["calibration_batch"]))
    calib = parity.sample_slabs(
        processed,
        "train",
        context,
        [(cfg["calibration_batch"], roi, roi)] * n_calib,
        seed,
        float(cfg["calibration_fg_fraction"]),
    )
    patches = parity.sample_patches(
        processed,
        "val",
        context,
        [(batch, roi, roi)] * math.ceil(int(cfg["sweep_slabs"]) / batch),
        seed,
        float(cfg["sweep_fg_fraction"]),
    )
    dice_fp32 = patch_dice(
        sessions.ort_session(fp32, cfg["threads"], cfg["graph_optimization"]), patches, threshold
    )
    with tempfile.TemporaryDirectory(dir=int8.parent, prefix=".quantize.") as tmp:
        prepared = quant.prepare(fp32, Path(tmp) / "prepared.onnx")
        configs = sweep(prepared, Path(tmp), calib, patches, dice_fp32, patches[0][0], cfg)
        chosen = quant.select(list(configs.values()), float(cfg["max_dice_drop"]), cfg["selection"])
        if chosen is None:
            raise GateError(
                f"quantize: no configuration keeps the val Dice within {cfg['max_dice_drop']} of fp32 "
                f"({dice_fp32:.4f}): "
                + ", ".join(f"{k} {v['dice']:.4f}" for k, v in configs.items())
            )
        with atomic_path(int8) as tmp_int8:
            shutil.copyfile(chosen["path"], tmp_int8)
    return {
        "chosen": {
            "scheme": chosen["scheme"],
            "method": chosen["method"],
            "selection": cfg["selection"],
            "selection_split": "val",
            "selection_slabs": sum(len(x) for x, _ in patches),
            "dice_val": chosen["dice"],
            "dice_val_fp32": dice_fp32,
        },
        "sweep": {
            k: {key: v[key] for key in ("dice", "dice_drop", "latency_ms", "passed")}
            for k, v in configs.items()
        },
        "calibration": {
            "split": "train",
            "slabs": sum(len(b) for b in calib),
            "roi_size": roi,
            "seed": seed,
        },
        "x_latency": patches[0][0],
    }


class SplitTally:
    """One model's figures over the test split, accumulated one case at a time: the rows and
    candidates :mod:`ctpipe.evaluation.scoring` summarises, and the pooled Dice counts."""

    def __init__(self) -> None:
        self.rows, self.cands = [], []
        self.dice = overlap.PooledDice()

    def add(self, case: dict, prob: np.ndarray, label: np.ndarray, geom, cfg: dict) -> np.ndarray:
        row, found, mask = scoring.score_case(case, prob, label, geom, cfg)
        self.rows.append(row)
        self.cands.append(found)
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


def measure_test_split(fp32: Path, int8: Path, processed: Path, context: int, cfg: dict) -> dict:
    """fp32 and INT8 on the whole test volumes: pooled and per-case Dice, HD95, CPM; the gate.

    One test volume at a time (both models on it, then the next), so memory does not grow with
    the size of the test split.
    """
    test = data.cases_in(data.load_index(processed), "test")
    if not test:
        raise ValueError(f"{processed}/index.json: the 'test' split is empty")
    nodules = data.load_nodules(processed)
    nodules = nodules[nodules["seriesuid"].isin([c["seriesuid"] for c in test])]
    nodules = nodules.reset_index(drop=True)
    predictors = {
        name: onnx_predictor(sessions.ort_session(path, cfg["threads"], cfg["graph_optimization"]))
        for name, path in (("fp32", fp32), ("int8", int8))
    }
    tally = {name: SplitTally() for name in predictors}
    agree = overlap.PooledDice()  # INT8 against fp32 masks
    plan = data.load_plan(processed)
    for case in progress(test, desc="test fp32 + int8", unit="case"):
        image, label, geom = data.load_case(processed, case["case_id"])
        image, label = np.asarray(image, dtype=np.float32), np.asarray(label) > 0
        box = lung_roi(image, plan, geom.spacing[::-1], cfg["lung_margin_mm"])
        masks = {}
        for name, predictor in predictors.items():
            prob = predict_volume(
                predictor,
                image,
                context,
                int(cfg["roi_size"]),
                float(cfg["overlap"]),
                views=cfg["views"],
                whole_slab=bool(cfg["whole_slab"]),
                box=box,
            )
            masks[name] = tally[name].add(case, prob, label, geom, cfg)
        agree.add(masks["int8"], masks["fp32"])
    f, q = (tally[n].figures(nodules) for n in ("fp32", "int8"))
    max_drop = float(cfg["max_dice_drop"])
    return {
        "dice_fp32": f["dice"],
        "dice_int8": q["dice"],
        "dice_drop": f["dice"] - q["dice"],
        "dice_definition": f"pooled over all voxels of the {len(test)} test cases, the nodule mask as evaluate "
        f"makes it (probability >= {cfg['threshold']}, components peaking >= {cfg['component_threshold']}), "
        "from one pass per view (evaluate also averages mirrored passes)",
        "dice_int8_vs_fp32": agree.value,
        "dice_case_mean_fp32": f["dice_case_mean"],
        "dice_case_mean_int8": q["dice_case_mean"],
        "hd95_mm_fp32": f["hd95_mm"],
        "hd95_mm_int8": q["hd95_mm"],
        "cpm_fp32": f["cpm"],
        "cpm_int8": q["cpm"],
        "cpm_drop": f["cpm"] - q["cpm"],
        "max_dice_drop": max_drop,
        "gate_passed": f["dice"] - q["dice"] <= max_drop,
        "test_cases": len(test),
    }


def run(model_path: Path, processed: Path, out_dir: Path, cfg: dict, seed: int) -> dict:
    start = time.perf_counter()
    threads = sessions.resolve_threads(cfg["threads"])
    torch.set_num_threads(threads)
    net, ckpt = nets.load_checkpoint(str(model_path))
    context = int(ckpt["train_params"]["context_slices"])
    out_dir.mkdir(parents=True, exist_ok=True)
    fp32, int8 = out_dir / "model_fp32.onnx", out_dir / "model_int8.onnx"
    onnx_export.export_onnx(
        net,
        nets.in_channels(ckpt["train_params"]),
        fp32,
        int(cfg["opset"]),
        {"ctpipe.context_slices": context},
    )
    phases = {"export": time.perf_counter() - start}
    result = choose_int8(fp32, int8, processed, context, cfg, seed)
    x_latency = result.pop("x_latency")
    phases["sweep"] = time.perf_counter() - start - sum(phases.values())
    result.update(measure_test_split(fp32, int8, processed, context, cfg))
    phases["test"] = time.perf_counter() - start - sum(phases.values())
    lat = latencies(net, fp32, int8, x_latency, cfg)
    phases["latency"] = time.perf_counter() - start - sum(phases.values())
    speedup = lat["fp32"]["median_ms"] / lat["int8"]["median_ms"]
    result.update(
        {
            "latency_ms_torch": lat["torch"]["median_ms"],
            "latency_ms_fp32": lat["fp32"]["median_ms"],
            "latency_ms_int8": lat["int8"]["median_ms"],
            "latency_p90_ms_torch": lat["torch"]["p90_ms"],
            "latency_p90_ms_fp32": lat["fp32"]["p90_ms"],
            "latency_p90_ms_int8": lat["int8"]["p90_ms"],
            "latency_runs": int(cfg["latency_runs"]),
            "latency_load_average_1min": lat["load_average_1min"],
            "latency_input_shape": list(x_latency.shape),
            "speedup_int8_vs_fp32": speedup,
            "speedup_fp32_vs_torch": lat["torch"]["median_ms"] / lat["fp32"]["median_ms"],
            "int8_faster": bool(speedup > 1.0),
            "speedup_target": float(cfg["speedup_target"]),
            "speedup_target_met": bool(speedup >= float(cfg["speedup_target"])),
            "size_bytes_fp32": fp32.stat().st_size,
            "size_bytes_int8": int8.stat().st_size,
            "size_ratio": int8.stat().st_size / fp32.stat().st_size,
            "threads": threads,
            "graph_optimization": cfg["graph_optimization"],
            "cpu": cpu_info(),
            "opset": int(cfg["opset"]),
            "seconds": time.perf_counter() - start,
            "seconds_by_phase": phases,
        }
    )
    return rounded(result)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__, "quantize")
    add_model_inputs(parser)
    parser.add_argument("out_dir", type=Path, help="fp32 and INT8 ONNX models (models/quantized)")
    args = parser.parse_args(argv)
    setup_logging()
    onnx_export.quiet_exporter_logs()
    cfg, seed = stage_params("quantize", args.params, shared=("inference",))
    cfg.update(choose.load(args.postprocessing))
    record_environment("quantize", Path(args.metrics).parent / "env")
    result = run(args.model, args.data_dir, args.out_dir, cfg, seed)
    # Metrics first, so a failed gate still leaves the figures to look at.
    write_json(args.metrics, result)
    log.info(
        "quantize: %s_%s Dice fp32 %.4f int8 %.4f (drop %.4f), %.1f ms -> %.1f ms (x%.2f, int8 faster: %s)",
        result["chosen"]["scheme"],
        result["chosen"]["method"],
        result["dice_fp32"],
        result["dice_int8"],
        result["dice_drop"],
        result["latency_ms_fp32"],
        result["latency_ms_int8"],
        result["speedup_int8_vs_fp32"],
        result["int8_faster"],
    )
    if not result["gate_passed"]:
        raise GateError(
            f"quantize: INT8 test Dice {result['dice_int8']:.4f} is {result['dice_drop']:.4f} below "
            f"fp32 {result['dice_fp32']:.4f}, more than quantize.max_dice_drop={result['max_dice_drop']}"
            f" (figures in {args.metrics})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
