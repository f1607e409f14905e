"""Train: a CPU smoke run, resume after a kill gives the same model, and DDP with 2 gloo processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ctpipe import synth
from ctpipe.model import training
from stages import preprocess, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def processed(tmp_path_factory, write_tiny_cohort, tiny_params) -> Path:
    """A tiny preprocessed dataset shared by the tests of this module."""
    root = tmp_path_factory.mktemp("cohort")
    rows = write_tiny_cohort(root / "in" / "dicom", n=4)
    synth.annotations_frame(rows).to_csv(root / "in" / "annotations.csv", index=False)
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params()))
    assert (
        preprocess.main(
            [
                str(root / "in"),
                str(root / "processed"),
                "--params",
                str(params),
                "--metrics",
                str(root / "pre.json"),
            ]
        )
        == 0
    )
    return root / "processed"


def run_train(processed: Path, out: Path, params_file: Path, *extra: str) -> int:
    return train.main(
        [
            str(processed),
            str(out / "model.pt"),
            "--checkpoints",
            str(out / "ckpt"),
            "--live",
            str(out / "live"),
            "--params",
            str(params_file),
            "--metrics",
            str(out / "train.json"),
            *extra,
        ]
    )


def test_smoke_writes_model_and_logs(processed, tmp_path, params_file):
    assert run_train(processed, tmp_path, params_file) == 0
    ckpt = torch.load(tmp_path / "model.pt", weights_only=False)
    assert {"state_dict", "train_params", "plan"} <= set(ckpt)
    assert ckpt["plan"]["target_spacing_mm"]
    metrics = json.loads((tmp_path / "train.json").read_text())
    assert metrics["epochs_run"] == 2
    for name in ("train_loss", "lr", "samples_per_s", "data_wait_fraction"):
        lines = (tmp_path / "live" / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()
        assert len(lines) == 3, name  # header + one row per epoch


def test_validation_every_n_epochs_and_after_the_last(processed, tmp_path, params_file):
    params = yaml.safe_load(params_file.read_text())
    params["train"].update(epochs=3, val_every=2)
    params_file.write_text(yaml.safe_dump(params))
    assert run_train(processed, tmp_path, params_file) == 0
    # dvclive steps: the validation loss after every epoch, the Dice after epochs 2 and 3
    for name, steps in (("val_loss", [0, 1, 2]), ("val_dice", [1, 2])):
        rows = (
            (tmp_path / "live" / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()[1:]
        )
        assert [int(r.split("\t")[0]) for r in rows] == steps, name
    assert torch.load(tmp_path / "model.pt", weights_only=False)["epoch"] in (1, 2)


def test_val_every_zero_runs_no_validation_dice(processed, tmp_path, params_file):
    """The default: the validation loss every epoch, no Dice pass over whole volumes (the
    postprocess stage measures the model on validation with evaluate's own inference)."""
    params = yaml.safe_load(params_file.read_text())
    params["train"].update(epochs=3, val_every=0, select="last")
    params_file.write_text(yaml.safe_dump(params))
    assert run_train(processed, tmp_path, params_file) == 0
    metrics = tmp_path / "live" / "plots" / "metrics"
    assert not (metrics / "val_dice.tsv").exists()
    assert len((metrics / "val_loss.tsv").read_text().splitlines()) == 4  # header + 3 epochs
    figures = json.loads((tmp_path / "train.json").read_text())
    assert figures["selected_epoch"] == 3 and "best_val_dice" not in figures
    ckpt = torch.load(tmp_path / "model.pt", weights_only=False)
    assert ckpt["val_dice"] is None and ckpt["best_val_dice"] is None


@pytest.mark.parametrize("change", [{"val_every": -1}, {"val_every": 0, "select": "best"}])
def test_bad_val_every_is_refused(processed, tmp_path, params_file, change):
    params = yaml.safe_load(params_file.read_text())
    params["train"].update(change)
    params_file.write_text(yaml.safe_dump(params))
    with pytest.raises(ValueError, match="val_every"):
        run_train(processed, tmp_path, params_file)


def test_resume_after_kill_gives_same_model(processed, tmp_path, params_file):
    params = yaml.safe_load(params_file.read_text())
    params["train"].update(epochs=3, samples_per_epoch=16)
    params_file.write_text(yaml.safe_dump(params))
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert run_train(processed, full, params_file) == 0
    # Killed in the middle of epoch 2 (the first epoch's checkpoint is on disk), then re-run.
    assert run_train(processed, killed, params_file, "--stop-after-steps", "6") == 3
    assert not (killed / "model.pt").exists()
    assert torch.load(killed / "ckpt" / "last.pt", weights_only=False)["epoch"] == 0
    assert run_train(processed, killed, params_file) == 0
    a = torch.load(full / "model.pt", weights_only=False)["state_dict"]
    b = torch.load(killed / "model.pt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    lines = (killed / "live" / "plots" / "metrics" / "train_loss.tsv").read_text().splitlines()
    assert len(lines) == 4  # dvclive resumed: 3 epochs logged once each


def test_finished_run_is_not_resumed(processed, tmp_path, params_file):
    assert run_train(processed, tmp_path, params_file) == 0
    first = torch.load(tmp_path / "model.pt", weights_only=False)["state_dict"]
    params = yaml.safe_load(params_file.read_text())
    params["train"]["lr"] = 0.01  # a new experiment must train afresh, not continue the old one
    params_file.write_text(yaml.safe_dump(params))
    assert run_train(processed, tmp_path, params_file) == 0
    second = torch.load(tmp_path / "model.pt", weights_only=False)["state_dict"]
    assert any(not torch.equal(first[k], second[k]) for k in first if first[k].is_floating_point())


@pytest.mark.slow
def test_ddp_two_gloo_processes(processed, tmp_path, params_file):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        str(ROOT / "stages" / "train.py"),
        str(processed),
        str(tmp_path / "model.pt"),
        "--checkpoints",
        str(tmp_path / "ckpt"),
        "--live",
        str(tmp_path / "live"),
        "--params",
        str(params_file),
        "--metrics",
        str(tmp_path / "train.json"),
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    params = yaml.safe_load((tmp_path / "live" / "params.yaml").read_text())
    assert params["world_size"] == 2
    assert (tmp_path / "model.pt").is_file()
    assert json.loads((tmp_path / "train.json").read_text())["epochs_run"] == 2


def test_loss_leaves_the_foreground_dice_of_empty_patches_out():
    from monai.losses import DiceCELoss, DiceLoss

    from ctpipe.model.training import make_loss

    torch.manual_seed(0)
    logits = torch.randn(3, 2, 16, 16)
    target = torch.zeros(3, 1, 16, 16)
    target[0, 0, 4:9, 4:9] = 1  # patches 1 and 2 hold no nodule voxel
    cfg = {"batch_dice": False, "dice_empty_patches": True}
    assert isinstance(make_loss(cfg), DiceCELoss)
    masked = make_loss({**cfg, "dice_empty_patches": False})
    per = DiceLoss(to_onehot_y=True, softmax=True, reduction="none")(logits, target).reshape(3, 2)
    ce = torch.nn.functional.cross_entropy(logits, target[:, 0].long())
    # the four Dice terms kept: both channels of patch 0, the background of patches 1 and 2
    expected = (per[0].sum() + per[1:, 0].sum()) / 4 + ce
    assert torch.allclose(masked(logits, target), expected)
    # confident background on an empty patch: no cliff, the loss falls with the logit gap
    empty = torch.zeros(1, 1, 16, 16)
    losses = [
        masked(torch.stack([torch.full((16, 16), g), torch.zeros(16, 16)])[None], empty).item()
        for g in (2.0, 10.0, 20.0)
    ]
    assert losses[0] > losses[1] > losses[2] and losses[1] < 1e-3
    # the gradient reaches the logits of every patch
    logits.requires_grad_(True)
    masked(logits, target).backward()
    assert (logits.grad.abs().sum(dim=(1, 2, 3)) > 0).all()


def test_the_same_checkpoint_is_the_same_bytes(tmp_path):
    """DVC hashes model.pt: equal weights must give equal files, whatever the temporary name."""
    state = {"state_dict": torch.nn.Linear(3, 2).state_dict(), "epoch": 1}
    training.save_checkpoint(tmp_path / "a" / "model.pt", **state)
    training.save_checkpoint(tmp_path / "b" / "model.pt", **state)
    first = (tmp_path / "a" / "model.pt").read_bytes()
    assert first == (tmp_path / "b" / "model.pt").read_bytes()
    loaded = torch.load(tmp_path / "a" / "model.pt", weights_only=False)
    assert torch.equal(loaded["state_dict"]["weight"], state["state_dict"]["weight"])
