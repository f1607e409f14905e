"""Stage train: fit the 2.5D MONAI BasicUNet on the training split.

In:  ``DATA_DIR`` (data/processed), params ``train`` + ``base.seed``
Out: ``MODEL`` (models/model.pt: the weights after the last epoch, as an exponential moving average
     when ``train.ema_decay`` > 0, with their params and the preprocessing plan), ``--onnx``
     (models/model.onnx: the same weights exported once for the stages after train, opset
     ``ctpipe.deploy.onnx_export.OPSET``), ``CKPT_DIR`` (models/checkpoints/last.pt, persisted
     between runs so an interrupted run resumes), ``LIVE_DIR`` (dvclive logs: per-epoch train and
     validation loss, learning rate, samples/s, data-wait fraction), ``metrics/train.json``.

Why the last (averaged) weights: the cosine schedule ends at zero and the average smooths the last
epochs; the post-processing of the model is then chosen on validation by the postprocess stage.
The validation loss on a fixed batch of val patches is logged every epoch; it decides nothing.
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

import numpy as np
import torch
import torch.distributed as dist
from dvclive import Live
from monai.data import set_track_meta

from ctpipe import config
from ctpipe.deploy import onnx_export
from ctpipe.fileio import rounded, write_json
from ctpipe.model import nets, training
from ctpipe.model.training import TrainData, TrainState
from ctpipe.params import setup_logging, stage_parser
from ctpipe.progress import progress
from ctpipe.runenv import record as record_environment

log = logging.getLogger("train")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    # Patches are plain tensors: MONAI's MetaTensor bookkeeping would cost more than the transforms.
    set_track_meta(False)
    params = config.load(args.params)
    cfg = params.train
    seed = params.base.seed if cfg.seed is None else cfg.seed
    if int(os.environ.get("RANK", "0")) == 0:
        record_environment("train", Path(args.metrics).parent / "env")
    device, rank, world, amp = training.setup_device(cfg.amp)
    data, state = training.build(args.data_dir, cfg, seed, device, amp, world)
    last = args.checkpoints / "last.pt"
    resumed = training.resume_state(last, cfg, seed, data.data_id)
    if resumed is not None:
        state.restore(resumed)
        log.info("resuming after epoch %d", state.epoch)
    model = torch.nn.parallel.DistributedDataParallel(state.net) if world > 1 else state.net
    if cfg.compile:
        model = torch.compile(model)
    live = (
        open_live(args.live, resumed is not None, cfg, seed, device, world, amp)
        if rank == 0
        else None
    )
    stop = args.stop_after_steps  # tests: a kill after this many steps of this process (0: none)
    for epoch in range(state.epoch, cfg.epochs):
        start = time.perf_counter()
        losses, wait = train_epoch(data, state, model, epoch, cfg, device, amp, rank, stop)
        if stop and len(losses) >= stop:
            log.warning("stopping after %d steps (--stop-after-steps)", args.stop_after_steps)
            return 3
        stop = stop - len(losses) if stop else 0
        state.epoch = epoch + 1
        if rank == 0:
            seconds = time.perf_counter() - start
            record = {
                "train_loss": float(np.mean(losses)),
                "lr": state.scheduler.get_last_lr()[0],
                "samples_per_s": len(losses) * cfg.batch_size * world / seconds,
                "data_wait_fraction": wait / seconds,
                # on a fixed batch of validation patches: well under a second
                "val_loss": training.val_loss(state.final, data.val_patches, state.loss_fn, device),
            }
            end_epoch(live, record, state)
            training.save_checkpoint(last, **state.checkpoint(cfg, seed, data.plan, data.data_id))
    if rank == 0:
        finish(args, live, state, cfg, seed, data)
    if world > 1:
        dist.destroy_process_group()
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = stage_parser(__doc__, "train")
    parser.add_argument("data_dir", type=Path, help="preprocessed dataset (data/processed)")
    parser.add_argument("model", type=Path, help="model to write (models/model.pt)")
    parser.add_argument(
        "--onnx", type=Path, required=True, help="its ONNX export to write (models/model.onnx)"
    )
    parser.add_argument(
        "--checkpoints", type=Path, required=True, help="last.pt (models/checkpoints)"
    )
    parser.add_argument(
        "--live", type=Path, required=True, help="dvclive directory (metrics/train)"
    )
    parser.add_argument(
        "--stop-after-steps", type=int, default=0, help=argparse.SUPPRESS
    )  # tests: simulate a kill
    return parser.parse_args(argv)


def open_live(live_dir: Path, resumed: bool, cfg: config.Train, seed: int, device, world, amp):
    """dvclive (appending when resumed, with the params logged once)."""
    live = Live(str(live_dir), resume=resumed, dvcyaml=False, save_dvc_exp=False)
    if not resumed:
        run = {"seed": seed, "device": str(device), "world_size": world, "amp": str(amp or "off")}
        live.log_params({"train": cfg.model_dump(), **run})
    return live


def train_epoch(
    data: TrainData, state: TrainState, model, epoch: int, cfg, device, amp, rank: int, stop: int
) -> tuple[list[float], float]:
    """One pass over the loader, or its first ``stop`` steps (when not 0): the batch losses and
    the seconds spent waiting for data."""
    data.dataset.set_epoch(epoch)
    model.train()
    losses, wait = [], 0.0
    bar = progress(
        data.loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=rank != 0
    )
    fetched = time.perf_counter()
    for batch in bar:
        wait += time.perf_counter() - fetched
        losses.append(training.step(state, model, batch, device, amp).item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", refresh=False)
        if stop and len(losses) >= stop:
            break
        fetched = time.perf_counter()
    else:
        # MONAI's ThreadDataLoader prints a failed batch's traceback and ends the epoch early;
        # going on would train the next epochs on nothing and log a NaN loss.
        if len(losses) < len(data.loader):
            raise RuntimeError(
                f"epoch {epoch + 1}: the loader gave {len(losses)} of {len(data.loader)} batches "
                "and stopped (the error that stopped it is printed above)"
            )
    return losses, wait


def end_epoch(live: Live, record: dict, state: TrainState) -> None:
    """Log the epoch's figures (rank 0 only)."""
    state.history.append(record)
    for key, value in record.items():
        live.log_metric(key, value)
    live.next_step()
    log.info("epoch %d: %s", state.epoch, rounded(record))


def finish(
    args: argparse.Namespace,
    live: Live,
    state: TrainState,
    cfg: config.Train,
    seed: int,
    data: TrainData,
) -> None:
    """Write the model and its ONNX export, mark the run complete, write the metrics (rank 0)."""
    training.write_model(args.model, state, cfg, seed, data.plan)
    # Exported from the file just written: the ONNX model is the model.pt downstream stages load.
    net, ckpt = nets.load_checkpoint(str(args.model))
    onnx_export.quiet_exporter_logs()
    channels = nets.in_channels(ckpt["train_params"])
    onnx_export.export_onnx(net, channels, args.onnx, onnx_export.OPSET)
    done = {**state.checkpoint(cfg, seed, data.plan, data.data_id), "complete": True}
    training.save_checkpoint(args.checkpoints / "last.pt", **done)  # a rerun starts afresh
    live.end()
    final = state.history[-1]
    figures = {"epochs_run": len(state.history), "train_loss": final["train_loss"]}
    write_json(args.metrics, rounded({**figures, "val_loss": final["val_loss"]}))


if __name__ == "__main__":
    sys.exit(main())
