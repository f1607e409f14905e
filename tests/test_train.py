"""Train: a CPU smoke run with its ONNX export, resume after a kill gives the same model, and DDP
with 2 gloo processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml

from ctpipe import config, synth
from ctpipe.model import nets, training
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
            "--onnx",
            str(out / "model.onnx"),
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


@pytest.fixture(scope="module")
def trained(processed, tmp_path_factory, tiny_params) -> Path:
    """The outputs of one tiny training run (2 epochs), shared by the tests that only read them."""
    out = tmp_path_factory.mktemp("trained")
    (out / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    assert run_train(processed, out, out / "params.yaml") == 0
    return out


def test_smoke_writes_model_and_logs(trained):
    ckpt = torch.load(trained / "model.pt", weights_only=False)
    assert {"state_dict", "train_params", "plan"} <= set(ckpt)
    assert ckpt["plan"]["target_spacing_mm"]
    metrics = json.loads((trained / "train.json").read_text())
    assert metrics["epochs_run"] == 2
    for name in ("train_loss", "lr", "samples_per_s", "data_wait_fraction"):
        lines = (trained / "live" / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()
        assert len(lines) == 3, name  # header + one row per epoch


def test_model_holds_the_last_averaged_weights_and_the_typed_params(trained, tiny_params):
    """model.pt: the weight average after the last epoch, with the train section as validated."""
    ckpt = torch.load(trained / "model.pt", weights_only=False)
    assert set(ckpt) == {"state_dict", "train_params", "plan", "seed", "epoch"}
    assert ckpt["epoch"] == 1 and ckpt["seed"] == tiny_params()["base"]["seed"]
    assert ckpt["train_params"] == config.validate(tiny_params()).train.model_dump()
    last = torch.load(trained / "ckpt" / "last.pt", weights_only=False)
    assert last["complete"] and last["epoch"] == 1
    averaged = {k.removeprefix("module."): v for k, v in last["ema"].items()}
    for key, value in ckpt["state_dict"].items():
        assert torch.equal(value, averaged[key]), key
    assert any(
        not torch.equal(ckpt["state_dict"][k], last["state_dict"][k])
        for k in ckpt["state_dict"]
        if ckpt["state_dict"][k].is_floating_point()
    )


def test_onnx_export_matches_the_model_in_onnx_runtime(trained):
    """models/model.onnx: the logits of model.pt, within 1e-3, on a random input whose size is
    neither the export example's nor square (batch and spatial dimensions are dynamic)."""
    net, ckpt = nets.load_checkpoint(str(trained / "model.pt"))
    x = np.random.default_rng(0).normal(size=(3, nets.in_channels(ckpt["train_params"]), 48, 80))
    x = x.astype(np.float32)
    session = ort.InferenceSession(str(trained / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x})
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    assert got.shape == expected.shape == (3, 2, 48, 80)
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=0)
    assert np.abs(expected).max() > 1e-2  # a real comparison, not of two near-zero outputs


def test_validation_loss_every_epoch_and_no_validation_dice(processed, tmp_path, params_file):
    """The validation loss on fixed patches after every epoch; no Dice pass over whole volumes
    (the postprocess stage measures the model on validation with evaluate's own inference)."""
    params = yaml.safe_load(params_file.read_text())
    params["train"].update(epochs=3)
    params_file.write_text(yaml.safe_dump(params))
    assert run_train(processed, tmp_path, params_file) == 0
    metrics = tmp_path / "live" / "plots" / "metrics"
    assert not (metrics / "val_dice.tsv").exists()
    assert len((metrics / "val_loss.tsv").read_text().splitlines()) == 4  # header + 3 epochs
    figures = json.loads((tmp_path / "train.json").read_text())
    assert figures["epochs_run"] == 3 and "best_val_dice" not in figures
    assert np.isfinite(figures["val_loss"])
    ckpt = torch.load(tmp_path / "model.pt", weights_only=False)
    assert ckpt["epoch"] == 2 and "val_dice" not in ckpt and "best_val_dice" not in ckpt


@pytest.mark.parametrize(
    "change, name",
    [
        ({"val_every": 0}, "val_every"),  # a key of a deleted path (commit 8e68312 has it)
        ({"select": "best"}, "select"),
        ({"lr": "0.003"}, "lr"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"views": ["axial", "axial"]}, "views"),
        ({"samples_per_epoch": 3}, "samples_per_epoch"),  # batch_size 4: no step in an epoch
    ],
)
def test_bad_train_params_are_refused_naming_the_key(
    processed, tmp_path, params_file, change, name
):
    params = yaml.safe_load(params_file.read_text())
    params["train"].update(change)
    params_file.write_text(yaml.safe_dump(params))
    with pytest.raises(config.ConfigError, match=name):
        run_train(processed, tmp_path, params_file)
    assert not (tmp_path / "model.pt").exists()


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
    # A rerun of the finished run (dvc repro -f) trains afresh and writes the same last.pt, which
    # DVC hashes: no timing in it. (The resumed run's holds the same values, pickled otherwise:
    # strings read back from the checkpoint are not the ones the fresh optimizer shares.)
    last = (full / "ckpt" / "last.pt").read_bytes()
    assert run_train(processed, full, params_file) == 0
    assert (full / "ckpt" / "last.pt").read_bytes() == last


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
        "--onnx",
        str(tmp_path / "model.onnx"),
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
    assert (tmp_path / "model.pt").is_file() and (tmp_path / "model.onnx").is_file()
    assert json.loads((tmp_path / "train.json").read_text())["epochs_run"] == 2


def test_loss_leaves_the_foreground_dice_of_empty_patches_out():
    from monai.losses import DiceLoss

    torch.manual_seed(0)
    logits = torch.randn(3, 2, 16, 16)
    target = torch.zeros(3, 1, 16, 16)
    target[0, 0, 4:9, 4:9] = 1  # patches 1 and 2 hold no nodule voxel
    masked = training.ForegroundPatchDiceCELoss()
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


def test_a_checkpoint_resumes_only_the_unfinished_run_of_its_params_seed_and_data(
    tmp_path, tiny_params
):
    cfg = config.validate(tiny_params()).train
    ckpt = {"train_params": cfg.model_dump(), "seed": 1, "data_id": "d", "complete": False}
    last = tmp_path / "last.pt"
    training.save_checkpoint(last, **ckpt)
    assert training.resume_state(last, cfg, 1, "d") == ckpt
    assert training.resume_state(last, cfg, 2, "d") is None  # base.seed changed, train.seed null
    assert training.resume_state(last, cfg, 1, "e") is None
    other = config.Train(**{**cfg.model_dump(), "lr": 0.01})
    assert training.resume_state(last, other, 1, "d") is None
    training.save_checkpoint(last, **{**ckpt, "complete": True})
    assert training.resume_state(last, cfg, 1, "d") is None
    assert training.resume_state(tmp_path / "none.pt", cfg, 1, "d") is None


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_an_epoch_whose_loader_fails_stops_the_run(monkeypatch):
    """A batch that cannot be read (a case file removed under the run) ends the epoch early in
    MONAI's ThreadDataLoader; the run must stop there, not log a NaN loss and train on nothing."""
    from types import SimpleNamespace

    from ctpipe.model import data as model_data

    class Dataset(torch.utils.data.Dataset):
        def __init__(self, broken: int | None):
            self.broken = broken

        def __len__(self):
            return 8

        def set_epoch(self, epoch):
            pass

        def __getitem__(self, item):
            if item == self.broken:
                raise FileNotFoundError("case_021.image.b2nd")
            return {"image": torch.zeros(1, 4, 4), "label": torch.zeros(1, 4, 4, dtype=torch.int64)}

    def epoch(dataset):
        batches = SimpleNamespace(dataset=dataset, loader=model_data.make_loader(dataset, 2, 0))
        cfg = SimpleNamespace(epochs=3)
        return train.train_epoch(batches, None, torch.nn.Identity(), 1, cfg, "cpu", None, 0, 0)

    monkeypatch.setattr(training, "step", lambda *args: torch.tensor(0.0))
    assert len(epoch(Dataset(broken=None))[0]) == 4
    with pytest.raises(RuntimeError, match=r"epoch 2: the loader gave 2 of 4 batches"):
        epoch(Dataset(broken=5))
