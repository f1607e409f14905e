"""The train stage on a CUDA GPU, side by side with the CPU: precision, torch.compile, throughput.

Every figure comes from the pieces the train stage is built of (``ctpipe.model``: the patch
dataset and loader, network, loss, optimiser, EMA and schedule of ``params.yaml``, stepped as
``stages/train.py`` steps them), on the preprocessed cases in ``--data``:

  training   samples/s, share of step time waiting for data, peak GPU memory, last losses, for
             CPU fp32 | CUDA fp32 | CUDA AMP bf16 | CUDA AMP fp16 (GradScaler) | CUDA AMP + compile
             (the first epoch, which compiles, is timed apart from the steady ones)
  learning   a short AMP run on the GPU, then the Dice over the validation volumes
  inference  whole validation volumes (axial, ``inference.whole_slab`` as params.yaml), CPU vs GPU

    python benchmarks/bench_gpu.py [--data data/processed] [--steps 100] [--learn-epochs 8]
        [--profile profiles/real-size.yaml]

``--profile`` applies a params profile (docs/real-size.md) to params.yaml first; ``--data`` must
then hold cases preprocessed with the same profile (its spacing), e.g. the ``data/processed`` of
a ``make exp PROFILE=...`` run. Without a CUDA GPU it prints the CPU figures and says so.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from monai.data import set_track_meta
from monai.metrics import compute_dice

from ctpipe import config, profiles
from ctpipe.model import data, infer, training
from ctpipe.model.training import TrainData, TrainState

ROOT = Path(__file__).resolve().parents[1]


def one_epoch(
    run: TrainData, state: TrainState, model, epoch: int, device, amp
) -> tuple[float, float, list]:
    """Seconds, seconds waiting for data, and the losses of one pass over the loader."""
    run.dataset.set_epoch(epoch)
    model.train()
    losses, wait = [], 0.0
    start = fetched = time.perf_counter()
    for batch in run.loader:
        wait += time.perf_counter() - fetched
        # .item() synchronises with the GPU every step, as the train stage does
        losses.append(training.step(state, model, batch, device, amp).item())
        fetched = time.perf_counter()
    return time.perf_counter() - start, wait, losses


def epochs(
    cfg: config.Train, device: torch.device, amp, compile_: bool, data_dir: Path, n: int
) -> dict:
    """Build a run as the train stage does (seed 0) and time ``n`` epochs of it."""
    run, state = training.build(data_dir, cfg, 0, device, amp, 1)
    model = torch.compile(state.net) if compile_ else state.net
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, waits, losses = [], [], []
    for epoch in range(n):
        seconds, wait, batch_losses = one_epoch(run, state, model, epoch, device, amp)
        times.append(seconds)
        waits.append(wait)
        losses += batch_losses
    steady = slice(1, None) if n > 1 else slice(0, None)  # the first epoch warms up (and compiles)
    samples = cfg.samples_per_epoch
    return {
        "net": state.final,
        "first_s": times[0],
        "rate": samples * len(times[steady]) / sum(times[steady]),
        "wait": sum(waits[steady]) / sum(times[steady]),
        "loss": float(np.mean(losses[-20:])),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0,
    }


def val_dice(net, processed: Path, context: int, inference: config.Inference, device) -> float:
    """Mean Dice over the validation cases with a nodule (axial, threshold 0.5)."""
    predictor = infer.torch_predictor(net.eval(), str(device))
    dices = []
    for case in data.cases_in(data.load_index(processed), "val"):
        image, label, _ = data.load_case(processed, case["case_id"])
        prob = infer.predict_volume(
            predictor,
            np.asarray(image, dtype=np.float32),
            context,
            inference.roi_size,
            inference.overlap,
            whole_slab=inference.whole_slab,
        )
        truth = torch.from_numpy(np.asarray(label) > 0)[None, None]
        if truth.any():
            pred = torch.from_numpy(prob >= 0.5)[None, None]
            dices.append(float(compute_dice(pred, truth, include_background=True).item()))
    return float(np.mean(dices)) if dices else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "processed")
    parser.add_argument("--steps", type=int, default=100, help="steps per timed epoch")
    parser.add_argument("--cpu-steps", type=int, default=20, help="steps per CPU epoch")
    parser.add_argument("--learn-epochs", type=int, default=8, help="epochs of the AMP run")
    parser.add_argument("--profile", type=Path, help="params profile applied to params.yaml")
    args = parser.parse_args()
    set_track_meta(False)  # as the train stage runs
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    if args.profile is not None:
        for key, value in profiles.load(args.profile).items():
            profiles.override(raw, key, value, source=str(args.profile))
    params = config.validate(raw, f"params.yaml with {args.profile or 'no profile'}")
    cfg = params.train
    batch = cfg.batch_size
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    if cuda:
        props = torch.cuda.get_device_properties(0)
        print(f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}")
    else:
        print("no CUDA GPU: CPU figures only")
    print(f"BasicUNet 2.5D features={cfg.features} patch={cfg.patch_size} batch={batch}")
    print(
        f"{'device':6s} {'precision':16s} {'samples/s':>10s} {'data wait':>10s} "
        f"{'1st epoch s':>12s} {'peak GiB':>9s} {'loss':>7s}"
    )
    bf16 = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
    modes = [("cpu", "fp32", None, False)]
    if cuda:
        modes += [
            ("cuda", "fp32", None, False),
            ("cuda", "amp bf16", bf16, False),
            ("cuda", "amp fp16", torch.float16, False),
            ("cuda", "amp bf16 compile", bf16, True),
        ]
    for dev, name, amp, compile_ in modes:
        steps = args.cpu_steps if dev == "cpu" else args.steps
        run_cfg = cfg.model_copy(update={"samples_per_epoch": steps * batch, "compile": compile_})
        r = epochs(run_cfg, torch.device(dev), amp, compile_, args.data, 3)
        print(
            f"{dev:6s} {name:16s} {r['rate']:10.1f} {100 * r['wait']:9.1f}% "
            f"{r['first_s']:12.1f} {r['peak_gib']:9.2f} {r['loss']:7.4f}"
        )
    device = torch.device("cuda" if cuda else "cpu")
    learn_cfg = cfg.model_copy(update={"epochs": args.learn_epochs})
    if not cuda:
        learn_cfg = learn_cfg.model_copy(update={"samples_per_epoch": args.cpu_steps * batch})
    start = time.perf_counter()
    r = epochs(learn_cfg, device, bf16 if cuda else None, False, args.data, args.learn_epochs)
    seconds = time.perf_counter() - start
    net, cases = r["net"], len(data.cases_in(data.load_index(args.data), "val"))
    for dev in ["cpu"] + (["cuda"] if cuda else []):
        net.to(dev)
        start = time.perf_counter()
        dice = val_dice(net, args.data, cfg.context_slices, params.inference, torch.device(dev))
        if dev == "cuda":
            torch.cuda.synchronize()
        per_case = (time.perf_counter() - start) / max(cases, 1)
        print(
            f"{dev:6s} validation of {cases} volumes after "
            f"{args.learn_epochs} epochs x {learn_cfg.samples_per_epoch} patches on {device} "
            f"({seconds:.0f} s, last loss {r['loss']:.4f}): Dice {dice:.3f}, "
            f"{per_case:.2f} s a volume"
        )


if __name__ == "__main__":
    main()
