"""Training throughput: samples/s and the share of step time spent waiting for data.

Two input pipelines feed the same network and optimizer, one after the other in one run:
  ctpipe   SlabPatchDataset (memory-mapped volumes, 1/3 foreground patches, MONAI array transforms)
           through the train stage's loader (a prefetching thread when --workers is 0)
  MONAI    the dictionary-transform chain of MONAI's tutorials on the same in-memory volumes:
           RandCropByPosNegLabeld (pos 1 : neg 2) + RandFlipd, RandRotate90d, RandScaleIntensityd,
           RandShiftIntensityd, RandGaussianNoised.
On the CPU, and on CUDA (with AMP) when a GPU is present. Goal: data wait under 10% of step time.

    python benchmarks/bench_train.py [--data data/processed] [--steps 40] [--workers 0]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from monai.data import set_track_meta
from monai.losses import DiceCELoss

from ctpipe import config
from ctpipe.model import data, nets

ROOT = Path(__file__).resolve().parents[1]


def make_dataset(tmp: Path, n: int) -> Path:
    """A small preprocessed cohort (ingest + preprocess on the synthetic generator)."""
    from ctpipe import synth

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    rows = []
    for i in range(n):
        rows += synth.write_case(tmp / "in" / "dicom", params["base"]["seed"], i, synth.Cohort())
    synth.annotations_frame(rows).to_csv(tmp / "in" / "annotations.csv", index=False)
    params["preprocess"]["split"].update(val_fraction=0.15, test_fraction=0.15)
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "stages" / "preprocess.py"),
            str(tmp / "in"),
            str(tmp / "processed"),
            "--params",
            str(tmp / "params.yaml"),
            "--metrics",
            str(tmp / "pre.json"),
        ],
        cwd=ROOT,
        check=True,
    )
    return tmp / "processed"


def monai_dataset(processed: Path, ids: list[str], cfg: config.Train, n: int):
    from monai.data import Dataset
    from monai.transforms import (
        Compose,
        Lambdad,
        RandCropByPosNegLabeld,
        RandFlipd,
        RandGaussianNoised,
        RandRotate90d,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    c, p = cfg.context_slices, cfg.patch_size
    items = []
    for cid in ids:
        image, label, _ = data.load_case(processed, cid)
        items.append(
            {"image": image[None].astype(np.float32), "label": label[None].astype(np.float32)}
        )
    chain = Compose(
        [
            RandCropByPosNegLabeld(
                keys=["image", "label"],
                label_key="label",
                spatial_size=(2 * c + 1, p, p),
                pos=1,
                neg=2,
                num_samples=1,
            ),
            Lambdad(keys="image", func=lambda x: x[0]),  # [1, 2c+1, P, P] -> slices as channels
            Lambdad(keys="label", func=lambda x: x[:, c]),  # centre slice
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=1),
            RandRotate90d(keys=["image", "label"], prob=0.5, max_k=3),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
            RandGaussianNoised(keys="image", prob=0.2, std=0.05),
        ]
    )
    repeated = [items[i % len(items)] for i in range(n)]
    return Dataset(repeated, transform=lambda d: {k: v for k, v in chain(d)[0].items()})


def run(loader, device, cfg, steps: int, amp) -> tuple[float, float]:
    net = nets.build_network(cfg).to(device, memory_format=nets.MEMORY_FORMAT)  # as the train stage
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    wait = busy = 0.0
    seen = 0
    it = iter(loader)
    for step in range(steps + 3):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        x = torch.as_tensor(batch["image"]).float().to(device, memory_format=nets.MEMORY_FORMAT)
        y = torch.as_tensor(batch["label"]).long().to(device)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if step >= 3:  # warm-up steps excluded
            wait, busy, seen = wait + t1 - t0, busy + t2 - t0, seen + x.shape[0]
    return seen / busy, wait / busy


def main() -> None:
    set_track_meta(False)  # as the train stage runs: plain tensors, no MetaTensor bookkeeping
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "processed")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument(
        "--cases", type=int, default=6, help="cases to generate when --data is missing"
    )
    args = parser.parse_args()
    cfg = config.load(ROOT / "params.yaml").train
    tmp = None
    if not (args.data / "index.json").is_file():
        tmp = Path(tempfile.mkdtemp())
        args.data = make_dataset(tmp, args.cases)
    ids = [c["case_id"] for c in data.cases_in(data.load_index(args.data), "train")]
    n = (args.steps + 3) * cfg.batch_size
    devices = [("cpu", None)]
    if torch.cuda.is_available():
        devices.append(
            ("cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        )
    print(
        f"network BasicUNet 2.5D features={cfg.features} patch={cfg.patch_size} "
        f"batch={cfg.batch_size} loader workers={args.workers} torch threads={torch.get_num_threads()}"
    )
    for dev, amp in devices:
        for name, ds in (
            (
                "ctpipe SlabPatchDataset",
                data.SlabPatchDataset(
                    args.data,
                    ids,
                    cfg.patch_size,
                    cfg.context_slices,
                    n,
                    cfg.fg_fraction,
                    0,
                ),
            ),
            ("MONAI dict-transform chain", monai_dataset(args.data, ids, cfg, n)),
        ):
            if name.startswith("ctpipe"):  # exactly the loader the train stage builds
                loader = data.make_loader(
                    ds, cfg.batch_size, args.workers, pin_memory=dev == "cuda"
                )
            else:  # the tutorials' plain DataLoader
                loader = torch.utils.data.DataLoader(
                    ds,
                    batch_size=cfg.batch_size,
                    num_workers=args.workers,
                    pin_memory=dev == "cuda",
                )
            rate, wait = run(loader, torch.device(dev), cfg, args.steps, amp)
            print(
                f"{dev:4s} {'amp ' + str(amp).split('.')[-1] if amp else 'fp32':9s} {name:28s} "
                f"{rate:8.1f} samples/s   data wait {100 * wait:5.1f}% of step time"
            )
    if tmp:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
