"""Stage train: fit the 2.5D MONAI BasicUNet on the training split; validate on the val split.

In:  ``DATA_DIR`` (data/processed), params ``train`` + ``base.seed``
Out: ``MODEL`` (models/model.pt: with ``train.select: last`` the weights after the last epoch, as an
     exponential moving average when ``train.ema_decay`` > 0; with ``best`` the checkpoint of the
     best validation Dice; with its params and the preprocessing plan), ``CKPT_DIR``
     (models/checkpoints: ``last.pt`` / ``best.pt``, persisted between runs so an interrupted run
     resumes), ``LIVE_DIR`` (dvclive logs: per-epoch train and
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
import logging
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from dvclive import Live
from monai.data import set_track_meta

from ctpipe.fileio import rounded, write_json
from ctpipe.model import data, nets, training
from ctpipe.params import setup_logging, stage_params, stage_parser
from ctpipe.progress import progress
from ctpipe.runenv import record as record_environment

log = logging.getLogger("train")


def train_seed(cfg: dict, base_seed: int) -> int:
    """``train.seed``, or ``base.seed`` when it is null."""
    return base_seed if cfg.get("seed") is None else int(cfg["seed"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = stage_parser(__doc__, "train")
    parser.add_argument("data_dir", type=Path, help="preprocessed dataset (data/processed)")
    parser.add_argument("model", type=Path, help="model to write (models/model.pt)")
    parser.add_argument(
        "--checkpoints", type=Path, required=True, help="last.pt / best.pt (models/checkpoints)"
    )
    parser.add_argument(
        "--live", type=Path, required=True, help="dvclive directory (metrics/train)"
    )
    parser.add_argument(
        "--stop-after-steps", type=int, default=0, help=argparse.SUPPRESS
    )  # tests: simulate a kill
    return parser.parse_args(argv)


def build(
    args: argparse.Namespace, cfg: dict, seed: int, device: torch.device, world: int
) -> SimpleNamespace:
    """Data, network, optimiser, EMA, schedule, scaler and loss of a run, in a fixed seeded order."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(device.type == "cpu", warn_only=True)
    index = data.load_index(args.data_dir)
    run = SimpleNamespace(
        plan=data.load_plan(args.data_dir),
        data_id=training.data_id(args.data_dir),
        val_cases=data.cases_in(index, "val"),
    )
    train_ids = [c["case_id"] for c in data.cases_in(index, "train")]
    run.dataset = training.train_dataset(args.data_dir, train_ids, cfg, seed)
    sampler = torch.utils.data.DistributedSampler(run.dataset, shuffle=False) if world > 1 else None
    run.loader = data.make_loader(
        run.dataset,
        int(cfg["batch_size"]),
        int(cfg["num_workers"]),
        sampler,
        pin_memory=device.type == "cuda",
    )
    run.net = nets.build_network(cfg).to(device, memory_format=nets.MEMORY_FORMAT)
    run.optimizer = training.make_optimizer(run.net, cfg)
    run.ema = training.make_ema(run.net, cfg)
    run.judged = (
        run.ema.module if run.ema is not None else run.net
    )  # the weights validated and written
    run.scheduler = training.make_schedule(run.optimizer, cfg, len(run.loader) * int(cfg["epochs"]))
    run.loss_fn = training.make_loss(cfg)
    # Cut after everything seeded above, so the network's initialisation does not depend on it.
    run.val_patches = training.val_patches(args.data_dir, run.val_cases, cfg, seed)
    run.start_epoch, run.best, run.stale, run.history = 0, -1.0, 0, []
    return run


def restore(run: SimpleNamespace, state: dict) -> None:
    """Continue an interrupted run from its last checkpoint."""
    run.net.load_state_dict(state["state_dict"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    if run.ema is not None:
        run.ema.load_state_dict(state["ema"])
    run.start_epoch, run.best, run.stale, run.history = (
        state["epoch"] + 1,
        state["best"],
        state["stale"],
        state["history"],
    )
    log.info("resuming after epoch %d (best val Dice %.4f)", state["epoch"], run.best)


def train_epoch(
    run: SimpleNamespace, model, epoch: int, cfg: dict, device, amp, rank: int, stop_after: int
) -> tuple[list[float], float, bool]:
    """One pass over the loader: the batch losses, the seconds spent waiting for data, and whether
    ``stop_after`` steps (a test's simulated kill) were reached."""
    run.dataset.set_epoch(epoch)
    model.train()
    losses, wait = [], 0.0
    bar = progress(
        run.loader, desc=f"epoch {epoch + 1}/{cfg['epochs']}", unit="batch", disable=rank != 0
    )
    t_fetch = time.perf_counter()
    for batch in bar:
        wait += time.perf_counter() - t_fetch
        losses.append(training.step(run, model, batch, device, amp).item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", refresh=False)
        run.steps_done += 1
        if stop_after and run.steps_done >= stop_after:
            log.warning("stopping after %d steps (--stop-after-steps)", run.steps_done)
            return losses, wait, True
        t_fetch = time.perf_counter()
    return losses, wait, False


def epoch_record(
    run: SimpleNamespace,
    args,
    cfg: dict,
    seed: int,
    device,
    epoch: int,
    losses: list[float],
    wait: float,
    seconds: float,
    world: int,
) -> dict:
    """The epoch's figures: the loss on fixed validation patches every epoch, the validation Dice
    every ``val_every`` epochs and after the last (0: never)."""
    record = {
        "train_loss": float(np.mean(losses)),
        "lr": run.scheduler.get_last_lr()[0],
        "samples_per_s": len(losses) * int(cfg["batch_size"]) * world / seconds,
        "data_wait_fraction": wait / seconds,
    }
    # The loss on the fixed validation patches costs well under a second; the Dice over whole
    # validation volumes costs about five epochs of training on 2 CPU cores.
    record["val_loss"] = training.val_loss(run.judged, run.val_patches, run.loss_fn, device)
    every = int(cfg["val_every"])
    if every > 0 and ((epoch + 1) % every == 0 or epoch + 1 == int(cfg["epochs"])):
        record["val_dice"] = training.validate(
            run.judged, args.data_dir, run.val_cases, cfg, device
        )
    return record


def checkpoint_state(run: SimpleNamespace, cfg: dict, seed: int) -> dict:
    return {
        "state_dict": run.net.state_dict(),
        "model_state_dict": run.judged.state_dict(),
        "ema": run.ema.state_dict() if run.ema is not None else None,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "train_params": cfg,
        "plan": run.plan,
        "seed": seed,
        "data_id": run.data_id,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    # Patches are plain tensors: MONAI's MetaTensor bookkeeping would cost more than the transforms.
    set_track_meta(False)
    cfg, base_seed = stage_params("train", args.params)
    seed = train_seed(cfg, base_seed)
    if cfg["select"] not in ("last", "best"):
        raise ValueError(f"train.select must be 'last' or 'best', got {cfg['select']!r}")
    if int(cfg["val_every"]) < 0:
        raise ValueError(
            f"train.val_every must be >= 0 (0: no validation Dice), got {cfg['val_every']!r}"
        )
    if cfg["select"] == "best" and int(cfg["val_every"]) == 0:
        raise ValueError("train.select: best needs the validation Dice: set train.val_every > 0")
    if int(os.environ.get("RANK", "0")) == 0:
        record_environment("train", Path(args.metrics).parent / "env")
    device, rank, world, amp = training.setup_device(cfg)
    run = build(args, cfg, seed, device, world)
    run.scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    state = training.resume_state(args.checkpoints, cfg, run.data_id)
    if state is not None:
        restore(run, state)
    model = torch.nn.parallel.DistributedDataParallel(run.net) if world > 1 else run.net
    if cfg["compile"]:
        model = torch.compile(model)
    live = open_live(args.live, state is not None, rank, cfg, seed, device, world, amp)
    code = fit(run, model, live, args, cfg, seed, device, amp, rank, world)
    if code == 0 and rank == 0:
        _finish(args, live, run.history, run.best, cfg["select"])
    if world > 1:
        dist.destroy_process_group()
    return code


def open_live(
    live_dir: Path, resumed: bool, rank: int, cfg: dict, seed: int, device, world: int, amp
):
    """dvclive on rank 0 (appending when resumed, with the params logged once); None elsewhere."""
    if rank != 0:
        return None
    live = Live(str(live_dir), resume=resumed, dvcyaml=False, save_dvc_exp=False)
    if not resumed:
        live.log_params(
            {
                "train": cfg,
                "seed": seed,
                "device": str(device),
                "world_size": world,
                "amp": str(amp) if amp else "off",
            }
        )
    return live


def fit(
    run: SimpleNamespace,
    model,
    live,
    args,
    cfg: dict,
    seed: int,
    device,
    amp,
    rank: int,
    world: int,
) -> int:
    """The epochs left of the run; 3 when ``--stop-after-steps`` cut it short, else 0."""
    run.steps_done = 0
    for epoch in range(run.start_epoch, int(cfg["epochs"])):
        t_epoch = time.perf_counter()
        losses, wait, killed = train_epoch(
            run, model, epoch, cfg, device, amp, rank, args.stop_after_steps
        )
        if killed:
            return 3
        done = [False]
        if rank == 0:
            seconds = time.perf_counter() - t_epoch
            record = epoch_record(run, args, cfg, seed, device, epoch, losses, wait, seconds, world)
            ckpt_state = checkpoint_state(run, cfg, seed)
            run.best, run.stale, done[0] = _end_epoch(
                args, live, record, run.history, epoch, run.best, run.stale, cfg, ckpt_state
            )
        if world > 1:  # rank 0 decides early stopping; every rank must leave the loop together
            dist.broadcast_object_list(done, src=0)
        if done[0]:
            break
    return 0


def _end_epoch(
    args, live, record, history, epoch, best, stale, cfg, ckpt_state
) -> tuple[float, int, bool]:
    """Log the epoch, keep best/last checkpoints, decide early stopping (rank 0 only)."""
    history.append(record)
    for key, value in record.items():
        live.log_metric(key, value)
    live.next_step()
    # ``stale``: epochs since the best validation Dice, counted at each validation.
    improved = False
    if "val_dice" in record:
        improved = record["val_dice"] > best
        step = max(int(cfg["val_every"]), 1)
        best, stale = (record["val_dice"], 0) if improved else (best, stale + step)
    # With select: last the schedule runs to its end (it ends at a zero learning rate).
    early = cfg["select"] == "best" and stale >= int(cfg["early_stopping_patience"])
    done = early or epoch + 1 == int(cfg["epochs"])
    ckpt = {
        **ckpt_state,
        "epoch": epoch,
        "best": best,
        "stale": stale,
        "history": history,
        "complete": done,
    }
    if improved:
        training.save_checkpoint(args.checkpoints / "best.pt", **ckpt)
    training.save_checkpoint(args.checkpoints / "last.pt", **ckpt)
    log.info("epoch %d: %s", epoch + 1, rounded(record))
    return best, stale, done


def _last_val_dice(history: list[dict]) -> float:
    """The validation Dice of the last validated epoch of ``history`` (NaN if none)."""
    return next((r["val_dice"] for r in reversed(history) if "val_dice" in r), float("nan"))


def _finish(args, live: Live, history: list[dict], best: float, select: str) -> None:
    """Copy the selected checkpoint (``last`` or ``best``) to the model path, flag the last one
    complete, and write the metrics."""
    last = torch.load(args.checkpoints / "last.pt", map_location="cpu", weights_only=False)
    state = (
        last
        if select == "last"
        else torch.load(args.checkpoints / "best.pt", map_location="cpu", weights_only=False)
    )
    validated = any("val_dice" in r for r in history)
    training.save_checkpoint(
        args.model,
        state_dict=state["model_state_dict"],
        train_params=state["train_params"],
        plan=state["plan"],
        seed=state["seed"],
        epoch=state["epoch"],
        best_val_dice=best if validated else None,
        selected=select,
        val_dice=_last_val_dice(state["history"]) if validated else None,
    )
    last["complete"] = True
    training.save_checkpoint(args.checkpoints / "last.pt", **last)
    live.end()
    final = history[-1]
    validated = [i for i, r in enumerate(history) if "val_dice" in r]
    figures = {
        "selected": select,
        "selected_epoch": state["epoch"] + 1,
        "epochs_run": len(history),
        "train_loss": final["train_loss"],
        "val_loss": final["val_loss"],
    }
    if validated:  # with train.val_every: 0 there is no validation Dice to report
        figures.update(
            best_val_dice=best,
            best_epoch=1 + max(validated, key=lambda i: (history[i]["val_dice"], -i)),
            selected_val_dice=_last_val_dice(state["history"]),
        )
    write_json(args.metrics, rounded(figures))


if __name__ == "__main__":
    sys.exit(main())
