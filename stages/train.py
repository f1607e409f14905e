"""Stage train: fit the 2.5D MONAI BasicUNet on the training split; validate on the val split.

In:  ``DATA_DIR`` (data/processed), params ``train`` + ``base.seed``
Out: ``MODEL`` (models/model.pt: with ``train.select: last`` the weights after the last epoch, as an
     exponential moving average when ``train.ema_decay`` > 0; with ``best`` the checkpoint of the best
     validation Dice; with its params and the preprocessing plan), ``CKPT_DIR`` (models/checkpoints: ``last.pt`` / ``best.pt``, persisted
     between runs so an interrupted run resumes), ``LIVE_DIR`` (dvclive logs: per-epoch train and
     val loss, val Dice, learning rate, samples/s, data-wait fraction), ``metrics/train.json``.

Why the last (averaged) weights by default: validation during training thresholds axial-only
predictions at 0.5 on a few cases, a noisy signal that differs from what evaluate reports; choosing
a mid-training checkpoint by it made the result hinge on numeric noise (another CPU picked epoch 12
and lost 0.3 test Dice). The cosine schedule ends at zero, and the weight average smooths the last
epochs. The post-processing of the model is then chosen on validation by the postprocess stage.
Seeds: ``train.seed`` (null: ``base.seed``) seeds initialisation and patch sampling, apart from the
cohort and split.

Runs on CUDA with AMP when a GPU is present, on the CPU otherwise; several GPUs or nodes with
``torchrun --nproc_per_node N stages/train.py ...`` (DDP; only rank 0 logs and writes).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from dvclive import Live
from torch.optim.swa_utils import AveragedModel
from monai.losses import DiceCELoss
from monai.metrics import compute_dice
from tqdm import tqdm

from ctpipe import data, infer, nets
from ctpipe.fileio import atomic_path, rounded, write_json
from ctpipe.params import stage_params
from ctpipe.runenv import record as record_environment

log = logging.getLogger("train")


def setup_device(cfg: dict) -> tuple[torch.device, int, int, torch.dtype | None]:
    """Device, rank, world size and AMP dtype (None: full precision)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available()
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    amp = None
    if cuda and cfg["amp"]:
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return device, rank, world, amp


def make_schedule(optimizer: torch.optim.Optimizer, cfg: dict, total_steps: int):
    """Per-step LR factor: cosine annealing or nnU-Net's poly (1 - t)^0.9."""
    if cfg["schedule"] == "cosine":
        fn = lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))  # noqa: E731
    elif cfg["schedule"] == "poly":
        fn = lambda step: (1 - min(step, total_steps) / total_steps) ** 0.9  # noqa: E731
    else:
        raise ValueError(f"train.schedule: unknown {cfg['schedule']!r} (cosine, poly)")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def make_optimizer(net: torch.nn.Module, cfg: dict) -> torch.optim.Optimizer:
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(net.parameters(), lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]))
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(net.parameters(), lr=float(cfg["lr"]), momentum=0.99, nesterov=True,
                               weight_decay=float(cfg["weight_decay"]))
    raise ValueError(f"train.optimizer: unknown {cfg['optimizer']!r} (adamw, sgd)")


def make_ema(net: torch.nn.Module, cfg: dict) -> AveragedModel | None:
    """Exponential moving average of the weights (and BatchNorm buffers), updated every step;
    None when ``train.ema_decay`` is 0.

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (TensorFlow's
    ``num_updates``, timm's warm-up): with a constant 0.998 the initial weights would still make up
    30% of the average after 600 steps, and the validation curve would judge a blend of early and
    late weights.
    """
    decay = float(cfg["ema_decay"])
    if not 0 <= decay < 1:
        raise ValueError(f"train.ema_decay must be in [0, 1), got {decay}")
    if decay == 0:
        return None

    def average(averaged: torch.Tensor, current: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        d = min(decay, (1.0 + float(n)) / (10.0 + float(n)))
        return averaged + (current - averaged) * (1.0 - d)

    return AveragedModel(net, avg_fn=average, use_buffers=True)


def train_seed(cfg: dict, base_seed: int) -> int:
    """``train.seed``, or ``base.seed`` when it is null."""
    return base_seed if cfg.get("seed") is None else int(cfg["seed"])


def validate(net, processed: Path, cases: list[dict], cfg: dict, device) -> float:
    """Mean Dice over the validation cases (whole volumes, sliding window, threshold 0.5)."""
    predictor = infer.torch_predictor(net, str(device))
    dices = []
    for case in cases:
        image, label, _ = data.load_case(processed, case["case_id"])
        prob = infer.predict_volume(predictor, np.asarray(image, dtype=np.float32), int(cfg["context_slices"]),
                                    int(cfg["val_roi_size"]), float(cfg["val_overlap"]), views=cfg["val_views"])
        pred = torch.from_numpy(prob >= 0.5)[None, None]
        truth = torch.from_numpy(np.asarray(label) > 0)[None, None]
        if truth.any():  # Dice is undefined without a nodule; such cases are judged by FROC
            dices.append(float(compute_dice(pred, truth, include_background=True).item()))
    net.train()
    return float(np.mean(dices)) if dices else 0.0


def save_checkpoint(path: Path, **state) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def resume_state(ckpt_dir: Path, cfg: dict, data_id: str) -> dict | None:
    """The last checkpoint if it belongs to an unfinished run with the same params and data."""
    last = ckpt_dir / "last.pt"
    if not last.is_file():
        return None
    state = torch.load(last, map_location="cpu", weights_only=False)
    if state.get("complete") or state["train_params"] != cfg or state.get("data_id") != data_id:
        log.info("%s is from a finished run or other params/data: starting afresh", last)
        return None
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path, help="preprocessed dataset (data/processed)")
    parser.add_argument("model", type=Path, help="best model to write (models/model.pt)")
    parser.add_argument("--checkpoints", type=Path, default=Path("models/checkpoints"))
    parser.add_argument("--live", type=Path, default=Path("metrics/train"), help="dvclive directory")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--metrics", type=Path, default=Path("metrics/train.json"))
    parser.add_argument("--stop-after-steps", type=int, default=0, help=argparse.SUPPRESS)  # tests: simulate a kill
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg, base_seed = stage_params("train", args.params)
    seed = train_seed(cfg, base_seed)
    if cfg["select"] not in ("last", "best"):
        raise ValueError(f"train.select must be 'last' or 'best', got {cfg['select']!r}")
    if int(os.environ.get("RANK", "0")) == 0:
        record_environment("train", Path(args.metrics).parent / "env")
    device, rank, world, amp = setup_device(cfg)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(device.type == "cpu", warn_only=True)

    index, plan = data.load_index(args.data_dir), data.load_plan(args.data_dir)
    data_id = _data_id(args.data_dir)
    train_ids = [c["case_id"] for c in data.cases_in(index, "train")]
    val_cases = data.cases_in(index, "val")
    dataset = data.SlabPatchDataset(args.data_dir, train_ids, cfg["patch_size"], cfg["context_slices"],
                                    cfg["samples_per_epoch"], cfg["fg_fraction"], seed,
                                    fg_sampling=cfg["fg_sampling"], views=cfg["views"])
    sampler = torch.utils.data.DistributedSampler(dataset, shuffle=False) if world > 1 else None
    loader = data.make_loader(dataset, int(cfg["batch_size"]), int(cfg["num_workers"]), sampler,
                              pin_memory=device.type == "cuda")
    net = nets.build_network(cfg).to(device, memory_format=nets.MEMORY_FORMAT)
    optimizer = make_optimizer(net, cfg)
    ema = make_ema(net, cfg)
    judged = ema.module if ema is not None else net  # the weights validated and written
    steps_per_epoch = len(loader)
    scheduler = make_schedule(optimizer, cfg, steps_per_epoch * int(cfg["epochs"]))
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    # batch_dice: one Dice over the whole batch (nnU-Net's choice), stabler for small nodules and
    # patches without any; otherwise one Dice per patch, averaged.
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=bool(cfg["batch_dice"]))

    start_epoch, best, stale, history = 0, -1.0, 0, []
    state = resume_state(args.checkpoints, cfg, data_id)
    if state is not None:
        net.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start_epoch, best, stale, history = state["epoch"] + 1, state["best"], state["stale"], state["history"]
        log.info("resuming after epoch %d (best val Dice %.4f)", state["epoch"], best)
    model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    if cfg["compile"]:
        model = torch.compile(model)
    live = Live(str(args.live), resume=state is not None, dvcyaml=False, save_dvc_exp=False) if rank == 0 else None
    if live is not None and state is None:
        live.log_params({"train": cfg, "seed": seed, "device": str(device), "world_size": world,
                         "amp": str(amp) if amp else "off"})

    steps_done = 0
    for epoch in range(start_epoch, int(cfg["epochs"])):
        dataset.set_epoch(epoch)
        model.train()
        losses, wait, t_epoch = [], 0.0, time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg['epochs']}", unit="batch", disable=rank != 0)
        t_fetch = time.perf_counter()
        for batch in bar:
            wait += time.perf_counter() - t_fetch
            x = batch["image"].to(device, non_blocking=True, memory_format=nets.MEMORY_FORMAT)
            y = batch["label"].to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = loss_fn(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(net)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
            steps_done += 1
            if args.stop_after_steps and steps_done >= args.stop_after_steps:
                log.warning("stopping after %d steps (--stop-after-steps)", steps_done)
                return 3
            t_fetch = time.perf_counter()
        seconds = time.perf_counter() - t_epoch
        done = [False]
        if rank == 0:
            record = {"train_loss": float(np.mean(losses)),
                      "lr": scheduler.get_last_lr()[0],
                      "samples_per_s": len(losses) * int(cfg["batch_size"]) * world / seconds,
                      "data_wait_fraction": wait / seconds}
            # Validation (whole val volumes) costs about as much as an epoch of training: every
            # val_every epochs, and always after the last one.
            if (epoch + 1) % int(cfg["val_every"]) == 0 or epoch + 1 == int(cfg["epochs"]):
                record["val_loss"] = _val_loss(judged, args.data_dir, val_cases, cfg, seed, loss_fn, device)
                record["val_dice"] = validate(judged, args.data_dir, val_cases, cfg, device)
            best, stale, done[0] = _end_epoch(args, live, record, history, epoch, best, stale, cfg, ckpt_state={
                "state_dict": net.state_dict(), "model_state_dict": judged.state_dict(),
                "ema": ema.state_dict() if ema is not None else None, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "train_params": cfg,
                "plan": plan, "seed": seed, "data_id": data_id})
        if world > 1:  # rank 0 decides early stopping; every rank must leave the loop together
            dist.broadcast_object_list(done, src=0)
        if done[0]:
            break
    if rank == 0:
        _finish(args, live, history, best, cfg["select"])
    if world > 1:
        dist.destroy_process_group()
    return 0


def _end_epoch(args, live, record, history, epoch, best, stale, cfg, ckpt_state) -> tuple[float, int, bool]:
    """Log the epoch, keep best/last checkpoints, decide early stopping (rank 0 only)."""
    history.append(record)
    for key, value in record.items():
        live.log_metric(key, value)
    live.next_step()
    # ``stale``: epochs since the best validation Dice, counted at each validation.
    improved = False
    if "val_dice" in record:
        improved = record["val_dice"] > best
        best, stale = (record["val_dice"], 0) if improved else (best, stale + int(cfg["val_every"]))
    # With select: last the schedule runs to its end (it ends at a zero learning rate).
    early = cfg["select"] == "best" and stale >= int(cfg["early_stopping_patience"])
    done = early or epoch + 1 == int(cfg["epochs"])
    ckpt = {**ckpt_state, "epoch": epoch, "best": best, "stale": stale, "history": history, "complete": done}
    if improved:
        save_checkpoint(args.checkpoints / "best.pt", **ckpt)
    save_checkpoint(args.checkpoints / "last.pt", **ckpt)
    log.info("epoch %d: %s", epoch + 1, rounded(record))
    return best, stale, done


def _last_val_dice(history: list[dict]) -> float:
    """The validation Dice of the last validated epoch of ``history`` (NaN if none)."""
    return next((r["val_dice"] for r in reversed(history) if "val_dice" in r), float("nan"))


def _data_id(processed: Path) -> str:
    """Identity of the training data: the index lists every case's id, shape and geometry."""
    return hashlib.sha256((processed / "index.json").read_bytes()).hexdigest()[:16]


def _val_loss(net, processed, val_cases, cfg, seed, loss_fn, device) -> float:
    """Loss on a fixed, un-augmented set of validation patches (the same every epoch)."""
    if not val_cases:
        return float("nan")
    ds = data.SlabPatchDataset(processed, [c["case_id"] for c in val_cases], cfg["patch_size"],
                               cfg["context_slices"], 4 * int(cfg["batch_size"]), cfg["fg_fraction"],
                               seed + 1, augment=False, views=cfg["views"])
    net.eval()
    with torch.inference_mode():
        batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
        x = batch["image"].to(device, memory_format=nets.MEMORY_FORMAT)
        loss = loss_fn(net(x), batch["label"].to(device)).item()
    net.train()
    return float(loss)


def _finish(args, live: Live, history: list[dict], best: float, select: str) -> None:
    """Copy the selected checkpoint (``last`` or ``best``) to the model path, flag the last one
    complete, and write the metrics."""
    last = torch.load(args.checkpoints / "last.pt", map_location="cpu", weights_only=False)
    state = last if select == "last" else torch.load(args.checkpoints / "best.pt", map_location="cpu",
                                                     weights_only=False)
    save_checkpoint(args.model, state_dict=state["model_state_dict"], train_params=state["train_params"],
                    plan=state["plan"], seed=state["seed"], epoch=state["epoch"], best_val_dice=best,
                    selected=select, val_dice=_last_val_dice(state["history"]))
    last["complete"] = True
    save_checkpoint(args.checkpoints / "last.pt", **last)
    live.end()
    final = history[-1]
    best_epoch = 1 + max((i for i, r in enumerate(history) if "val_dice" in r),
                         key=lambda i: (history[i]["val_dice"], -i), default=-1)
    write_json(args.metrics, rounded({
        "best_val_dice": best, "best_epoch": best_epoch, "selected": select, "selected_epoch": state["epoch"] + 1,
        "selected_val_dice": _last_val_dice(state["history"]), "epochs_run": len(history),
        "train_loss": final["train_loss"], "val_loss": final["val_loss"],
    }))


if __name__ == "__main__":
    sys.exit(main())
