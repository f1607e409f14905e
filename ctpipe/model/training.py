"""The pieces of a training run the train stage puts together: device and DDP set-up, optimiser,
learning-rate schedule, weight averaging (EMA), checkpoints that let an interrupted run resume.

The loop itself stays in ``stages/train.py``, explicit, where it can be read top to bottom.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from monai.losses import DiceCELoss, DiceLoss
from monai.metrics import compute_dice
from torch.optim.swa_utils import AveragedModel

from ctpipe.fileio import atomic_path
from ctpipe.model import data, infer, nets

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
        return torch.optim.AdamW(
            net.parameters(), lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"])
        )
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(
            net.parameters(),
            lr=float(cfg["lr"]),
            momentum=0.99,
            nesterov=True,
            weight_decay=float(cfg["weight_decay"]),
        )
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


def train_dataset(processed: Path, case_ids: list[str], cfg: dict, seed: int):
    """The training patches of ``train`` params ``cfg`` (:class:`ctpipe.model.data.SlabPatchDataset`)."""
    return data.SlabPatchDataset(
        processed,
        case_ids,
        cfg["patch_size"],
        cfg["context_slices"],
        cfg["samples_per_epoch"],
        cfg["fg_fraction"],
        seed,
        fg_sampling=cfg["fg_sampling"],
        views=cfg["views"],
        hard_fraction=float(cfg["hard_fraction"]),
        affine_prob=float(cfg["affine_prob"]),
        scale_range=cfg["scale_range"],
    )


def step(run, model, batch: dict, device: torch.device, amp) -> torch.Tensor:
    """One optimisation step on ``batch``: ``run`` holds ``net`` (the weights the EMA follows),
    ``optimizer``, ``scaler``, ``scheduler``, ``ema`` (or None) and ``loss_fn``; ``model`` is
    ``net`` or its DDP / compiled wrapper. Returns the loss (on the device)."""
    x = batch["image"].to(device, non_blocking=True, memory_format=nets.MEMORY_FORMAT)
    y = batch["label"].to(device, non_blocking=True)
    run.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        loss = run.loss_fn(model(x), y)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    if run.ema is not None:
        run.ema.update_parameters(run.net)
    return loss


def save_checkpoint(path: Path, **state) -> None:
    """Write ``state`` atomically. Through a file object: given a path, ``torch.save`` names the
    archive's inner folder after the (random) temporary file, so the same weights gave other bytes
    and another DVC hash in every run; a file object gets torch's fixed name."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)


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


def validate(net, processed: Path, cases: list[dict], cfg: dict, device) -> float:
    """Mean Dice over the validation cases (whole volumes, sliding window, threshold 0.5)."""
    predictor = infer.torch_predictor(net, str(device))
    dices = []
    for case in cases:
        image, label, _ = data.load_case(processed, case["case_id"])
        prob = infer.predict_volume(
            predictor,
            np.asarray(image, dtype=np.float32),
            int(cfg["context_slices"]),
            int(cfg["val_roi_size"]),
            float(cfg["val_overlap"]),
            views=cfg["val_views"],
        )
        pred = torch.from_numpy(prob >= 0.5)[None, None]
        truth = torch.from_numpy(np.asarray(label) > 0)[None, None]
        if truth.any():  # Dice is undefined without a nodule; such cases are judged by FROC
            dices.append(float(compute_dice(pred, truth, include_background=True).item()))
    net.train()
    return float(np.mean(dices)) if dices else 0.0


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


def make_loss(cfg: dict) -> torch.nn.Module:
    """Dice + cross-entropy as ``train.batch_dice`` and ``train.dice_empty_patches`` ask."""
    if bool(cfg["batch_dice"]) or bool(cfg["dice_empty_patches"]):
        # batch_dice: one Dice over the whole batch (nnU-Net's choice), stabler for small nodules
        # and patches without any; otherwise one Dice per patch, averaged.
        return DiceCELoss(to_onehot_y=True, softmax=True, batch=bool(cfg["batch_dice"]))
    return ForegroundPatchDiceCELoss()


def data_id(processed: Path) -> str:
    """Identity of the training data: the index lists every case's id, shape and geometry."""
    return hashlib.sha256((processed / "index.json").read_bytes()).hexdigest()[:16]


def val_patches(processed: Path, val_cases: list[dict], cfg: dict, seed: int) -> dict | None:
    """A fixed, un-augmented batch of validation patches (None without validation cases), cut
    once per run so that every epoch's validation loss sees the same patches."""
    if not val_cases:
        return None
    ds = data.SlabPatchDataset(
        processed,
        [c["case_id"] for c in val_cases],
        cfg["patch_size"],
        cfg["context_slices"],
        4 * int(cfg["batch_size"]),
        cfg["fg_fraction"],
        seed + 1,
        augment=False,
        views=cfg["views"],
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
