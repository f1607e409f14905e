"""The pieces of a training run that the train stage puts together: device and DDP set-up, the
run's data and state built in one fixed seeded order, one optimisation step, checkpoints that let an
interrupted run resume, and the model file.

The loop itself stays in ``stages/train.py``, explicit, where it can be read top to bottom.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from monai.losses import DiceLoss
from torch.optim.swa_utils import AveragedModel

from ctpipe.config import Train
from ctpipe.fileio import atomic_path
from ctpipe.model import data, nets

log = logging.getLogger("train")


def setup_device(amp: bool) -> tuple[torch.device, int, int, torch.dtype | None]:
    """Device, rank, world size and AMP dtype (None: full precision; ``amp`` only on CUDA)."""
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
    dtype = None
    if cuda and amp:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return device, rank, world, dtype


def make_schedule(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int):
    """Per-step LR factor: cosine annealing or nnU-Net's poly (1 - t)^0.9."""
    if schedule == "cosine":
        fn = lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))  # noqa: E731
    else:  # "poly", the only other choice config.Train allows
        fn = lambda step: (1 - min(step, total_steps) / total_steps) ** 0.9  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def make_optimizer(net: torch.nn.Module, cfg: Train) -> torch.optim.Optimizer:
    """AdamW, or SGD with Nesterov momentum 0.99 (nnU-Net's)."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        net.parameters(), lr=cfg.lr, momentum=0.99, nesterov=True, weight_decay=cfg.weight_decay
    )


def make_ema(net: torch.nn.Module, decay: float) -> AveragedModel | None:
    """Exponential moving average of the weights (and BatchNorm buffers), updated every step;
    None when ``decay`` (``train.ema_decay``) is 0.

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (TensorFlow's
    ``num_updates``, timm's warm-up): with a constant 0.998 the initial weights would still make up
    30% of the average after 600 steps.
    """
    if decay == 0:
        return None

    def average(averaged: torch.Tensor, current: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        d = min(decay, (1.0 + float(n)) / (10.0 + float(n)))
        return averaged + (current - averaged) * (1.0 - d)

    return AveragedModel(net, avg_fn=average, use_buffers=True)


class ForegroundPatchDiceCELoss(torch.nn.Module):
    """Cross-entropy over every patch plus a per-patch Dice over the patches holding nodule voxels.

    On a patch without nodule voxels the foreground Dice loss stays near 1 (0.5 averaged with the
    background channel) until every pixel's foreground probability is below about 1e-9, then drops
    to 0 (MONAI's smoothing of 1e-5): a cliff that rewards extreme background logits rather than a
    better mask. Here such a patch contributes cross-entropy and its background Dice only.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dice = DiceLoss(to_onehot_y=True, softmax=True, reduction="none")
        self.ce = torch.nn.CrossEntropyLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per = self.dice(logits, target).reshape(logits.shape[0], logits.shape[1])  # [B, C]
        keep = torch.ones_like(per, dtype=torch.bool)
        keep[:, 1:] = (target.reshape(target.shape[0], -1) > 0).any(dim=1, keepdim=True)
        dice = per[keep].mean()
        return dice + self.ce(logits, target[:, 0].long())


TIMINGS = ("samples_per_s", "data_wait_fraction")  # of an epoch's record: logged, not checkpointed


@dataclass
class TrainData:
    """What a run reads: the training patches and their loader, a fixed batch of validation
    patches (None without validation cases), the preprocessing plan and the data's identity."""

    dataset: data.SlabPatchDataset
    loader: Any
    val_patches: dict | None
    plan: dict
    data_id: str


@dataclass
class TrainState:
    """What a run changes, and what its checkpoint holds: the network being trained (``net``, the
    weights the average follows), optimiser, schedule, AMP scaler, weight average (or None), the
    loss, the next epoch to run and the figures of the epochs done."""

    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: AveragedModel | None
    loss_fn: torch.nn.Module
    epoch: int = 0
    history: list[dict] = field(default_factory=list)

    @property
    def final(self) -> torch.nn.Module:
        """The weights validated and written: the average when there is one."""
        return self.ema.module if self.ema is not None else self.net

    def checkpoint(self, cfg: Train, seed: int, plan: dict, data_id: str) -> dict:
        """Everything :meth:`restore` needs, with the params, seed and data it belongs to."""
        return {
            "state_dict": self.net.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "train_params": cfg.model_dump(),
            "plan": plan,
            "seed": seed,
            "data_id": data_id,
            "epoch": self.epoch - 1,
            # without the timings: the same training writes the same bytes (DVC hashes last.pt)
            "history": [{k: v for k, v in r.items() if k not in TIMINGS} for r in self.history],
            "complete": False,
        }

    def restore(self, ckpt: dict) -> None:
        """Continue an interrupted run from its :meth:`checkpoint`."""
        self.net.load_state_dict(ckpt["state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(ckpt["ema"])
        self.epoch, self.history = ckpt["epoch"] + 1, ckpt["history"]


def build(
    processed: Path, cfg: Train, seed: int, device: torch.device, amp, world: int
) -> tuple[TrainData, TrainState]:
    """The data and state of a run, in a fixed seeded order (the network's initialisation and so
    the model depend on it)."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(device.type == "cpu", warn_only=True)
    index = data.load_index(processed)
    train_ids = [c["case_id"] for c in data.cases_in(index, "train")]
    dataset = data.SlabPatchDataset(
        processed,
        train_ids,
        cfg.patch_size,
        cfg.context_slices,
        cfg.samples_per_epoch,
        cfg.fg_fraction,
        seed,
        views=cfg.views,
        hard_fraction=cfg.hard_fraction,
    )
    sampler = torch.utils.data.DistributedSampler(dataset, shuffle=False) if world > 1 else None
    loader = data.make_loader(
        dataset, cfg.batch_size, cfg.num_workers, sampler, pin_memory=device.type == "cuda"
    )
    net = nets.basic_unet(cfg.context_slices, cfg.features)
    net = net.to(device, memory_format=nets.MEMORY_FORMAT)
    optimizer = make_optimizer(net, cfg)
    state = TrainState(
        net=net,
        optimizer=optimizer,
        ema=make_ema(net, cfg.ema_decay),
        scheduler=make_schedule(optimizer, cfg.schedule, len(loader) * cfg.epochs),
        scaler=torch.amp.GradScaler("cuda", enabled=amp == torch.float16),
        loss_fn=ForegroundPatchDiceCELoss(),
    )
    # Cut after everything seeded above, so the network's initialisation does not depend on it.
    val = val_patches(processed, data.cases_in(index, "val"), cfg, seed)
    return TrainData(dataset, loader, val, data.load_plan(processed), data_id(processed)), state


def step(state: TrainState, model, batch: dict, device: torch.device, amp) -> torch.Tensor:
    """One optimisation step of ``state`` on ``batch``; ``model`` is ``state.net`` or its DDP /
    compiled wrapper. Returns the loss (on the device)."""
    x = batch["image"].to(device, non_blocking=True, memory_format=nets.MEMORY_FORMAT)
    y = batch["label"].to(device, non_blocking=True)
    state.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        loss = state.loss_fn(model(x), y)
    state.scaler.scale(loss).backward()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    if state.ema is not None:
        state.ema.update_parameters(state.net)
    return loss


def save_checkpoint(path: Path, **state) -> None:
    """Write ``state`` atomically. Through a file object: given a path, ``torch.save`` names the
    archive's inner folder after the (random) temporary file, so the same weights gave other bytes
    and another DVC hash in every run; a file object gets torch's fixed name."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)


def resume_state(last: Path, cfg: Train, seed: int, data_id: str) -> dict | None:
    """The checkpoint ``last`` if it belongs to an unfinished run of the same params, seed and
    data; None otherwise (a fresh run)."""
    if not last.is_file():
        return None
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    same = (ckpt["train_params"], ckpt.get("seed"), ckpt.get("data_id")) == (
        cfg.model_dump(),
        seed,
        data_id,
    )
    if ckpt.get("complete") or not same:
        log.info("%s is from a finished run or other params/data: starting afresh", last)
        return None
    return ckpt


def write_model(path: Path, state: TrainState, cfg: Train, seed: int, plan: dict) -> None:
    """models/model.pt: the final weights (on the CPU) with the params, seed and preprocessing plan
    they need, so that the file alone says how to rebuild and feed the network."""
    weights = state.final.state_dict()  # an OrderedDict with the modules' version _metadata
    for key, value in weights.items():
        weights[key] = value.cpu()  # the same tensor where it is on the CPU already
    save_checkpoint(
        path,
        state_dict=weights,
        train_params=cfg.model_dump(),
        plan=plan,
        seed=seed,
        epoch=state.epoch - 1,
    )


def data_id(processed: Path) -> str:
    """Identity of the training data: the index lists every case's id, shape and geometry."""
    return hashlib.sha256((processed / "index.json").read_bytes()).hexdigest()[:16]


def val_patches(processed: Path, val_cases: list[dict], cfg: Train, seed: int) -> dict | None:
    """A fixed, un-augmented batch of validation patches (None without validation cases), cut
    once per run so that every epoch's validation loss sees the same patches."""
    if not val_cases:
        return None
    ds = data.SlabPatchDataset(
        processed,
        [c["case_id"] for c in val_cases],
        cfg.patch_size,
        cfg.context_slices,
        4 * cfg.batch_size,
        cfg.fg_fraction,
        seed + 1,
        augment=False,
        views=cfg.views,
    )
    return torch.utils.data.default_collate([ds[i] for i in range(len(ds))])


def val_loss(net, batch: dict | None, loss_fn, device) -> float:
    """Loss on the :func:`val_patches` batch (NaN without one)."""
    if batch is None:
        return float("nan")
    net.eval()
    with torch.inference_mode():
        x = batch["image"].to(device, memory_format=nets.MEMORY_FORMAT)
        loss = loss_fn(net(x), batch["label"].to(device)).item()
    net.train()
    return float(loss)
