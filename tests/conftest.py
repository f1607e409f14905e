"""Shared fixtures: a tiny synthetic cohort written as DICOM, tiny params for every stage, and a
tiny processed dataset with a random-init network.

Test files reach these helpers through the fixtures below, never by importing this file or another
test file."""

from __future__ import annotations

import contextlib
import copy
import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml

from ctpipe import synth
from ctpipe.fileio import write_json
from ctpipe.geometry import Geometry
from ctpipe.volumes import case_files, write_volume

# torch, onnx and ctpipe.model are imported where used: collecting the light test files (geometry,
# de-identification, params) should not pay for them.

ROOT = Path(__file__).resolve().parents[1]

TINY_SYNTH = synth.Cohort(
    n_patients=4,
    matrix=48,
    pixel_spacing_mm=(5.0, 6.0),
    slice_spacing_mm=(5.0,),
    vessels_per_lung=2,
    fraction_without_nodules=0.0,
    max_nodules=2,
    diameter_mm=(12, 30),
)


@pytest.fixture(autouse=True)
def keep_umask():
    """Every test starts and ends with the session's umask: the DICOM node's ``main`` sets 077
    for its own files, and a test that runs it in this process must not hand that on."""
    mask = os.umask(0o022)
    os.umask(mask)
    yield
    os.umask(mask)


def tiny_params() -> dict:
    """params.yaml with every section shrunk so that the whole pipeline runs in about a minute."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["base"].update(workers=1)
    params["ingest"].update(
        min_slices=8, synthetic={"n_patients": 4, "matrix": 48, "oblique_degrees": 0}
    )
    params["preprocess"].update(split={"val_fraction": 0.25, "test_fraction": 0.25})
    params["train"].update(
        features=[4, 4, 8, 8, 16, 4],
        patch_size=32,
        batch_size=4,
        epochs=2,
        samples_per_epoch=8,
    )
    params["inference"].update(roi_size=64)
    params["evaluate"].update(bootstrap=20)
    # An untrained tiny model: the INT8 gate is opened, the sweep shrunk.
    params["quantize"].update(max_dice_drop=1.0, calibration_slabs=8, sweep_slabs=16)
    return params


@pytest.fixture(scope="session", name="tiny_params")
def tiny_params_factory():
    """``tiny_params()``: a fresh dict of the tiny params (for tests that edit them first)."""
    return tiny_params


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params()))
    return path


def write_tiny_cohort(out: Path, n: int = 3, seed: int = 7, **overrides) -> list[dict]:
    """Write ``n`` tiny synthetic studies under ``out``; return their annotation rows."""
    cohort = TINY_SYNTH.but(**overrides)
    rows = []
    for i in range(n):
        rows += synth.write_case(out, seed, i, cohort)
    return rows


@pytest.fixture(scope="session", name="write_tiny_cohort")
def write_tiny_cohort_factory():
    """``write_tiny_cohort(out, n=3, seed=7, **synth_overrides)`` -> annotation rows."""
    return write_tiny_cohort


@pytest.fixture(scope="session")
def tiny_synth() -> synth.Cohort:
    """The synthetic cohort of :func:`write_tiny_cohort` (frozen: vary it with ``.but(...)``)."""
    return TINY_SYNTH


def scramble_slice_order(study: Path, seed: int = 0) -> list[Path]:
    """Give the slices of ``study`` file names and InstanceNumbers in two random orders, neither
    of them (nor its reverse) the order of the slices along the normal; return the files in
    position order.

    Only sorting by ImagePositionPatient along the slice normal then finds the true order.
    """
    files = sorted(study.glob("*.dcm"))  # synth writes IM0001.dcm ... in position order
    rng = np.random.default_rng(seed)
    numbers, names = rng.permutation(len(files)), rng.permutation(len(files))
    for order in (numbers, names):
        assert not (np.all(np.diff(order) > 0) or np.all(np.diff(order) < 0))
    out = []
    for f, number, name in zip(files, numbers, names):
        ds = pydicom.dcmread(f)
        ds.InstanceNumber = int(number) + 1
        ds.save_as(f)
        out.append(f.rename(study / f"S{name:04d}.dcm"))
    return out


@pytest.fixture(scope="session", name="scramble_slice_order")
def scramble_slice_order_factory():
    """``scramble_slice_order(study_dir, seed=0)``: names and InstanceNumbers out of order."""
    return scramble_slice_order


# A tiny processed dataset and a random-init network, for the export, quantize and postprocess
# tests: one case per entry of PROCESSED_SPLITS, each with a sphere nodule.
TINY_NET = {"context_slices": 1, "features": [4, 4, 8, 8, 16, 4], "patch_size": 32}
PROCESSED_SPLITS = ("train", "train", "val", "test")
PROCESSED_SHAPE = (12, 64, 48)  # k, j, i: non-square slices
PROCESSED_SPACING = (1.0, 1.0, 2.0)  # x, y, z mm
PROCESSED_PLAN = {
    "target_spacing_mm": list(PROCESSED_SPACING),
    "interpolation": "linear",
    "normalization": {"kind": "window", "clip": [-1000, 400], "mean": -500.0, "std": 400.0},
}


def make_processed(root: Path, test_offset: float = 0.0) -> Path:
    """Write the tiny processed dataset under ``root``; return ``root``.

    ``test_offset`` is added to the test case's image, so a test can tell its slabs apart.
    """
    shape, spacing = PROCESSED_SHAPE, PROCESSED_SPACING
    rng = np.random.default_rng(0)
    (root / "cases").mkdir(parents=True)
    entries, nodules = [], []
    kk, jj, ii = np.indices(shape)
    for n, split in enumerate(PROCESSED_SPLITS):
        case_id, uid = f"case_{n:03d}", f"1.2.3.{n}"
        centre = np.array([shape[0] // 2, 20 + 4 * n, 18 + 3 * n])  # k, j, i
        radius_mm = 5.0 + n
        dist = np.sqrt(
            ((kk - centre[0]) * spacing[2]) ** 2
            + ((jj - centre[1]) * spacing[1]) ** 2
            + ((ii - centre[2]) * spacing[0]) ** 2
        )
        label = (dist <= radius_mm).astype(np.uint8)
        offset = test_offset if split == "test" else 0.0
        image = rng.normal(-1.0, 0.3, shape) + 2.5 * label + offset
        image_file, label_file = case_files(root, case_id)
        write_volume(image_file, image.astype(np.float16))
        write_volume(label_file, label)
        geom = Geometry(origin=[0.0, 0.0, 0.0], spacing=spacing)
        entries.append(
            {
                "case_id": case_id,
                "seriesuid": uid,
                "patient_id": f"p{n}",
                "split": split,
                "shape": list(shape),
                "geometry": geom.to_dict(),
                "nodules": 1,
                "foreground_voxels": int(label.sum()),
            }
        )
        x, y, z = centre[2] * spacing[0], centre[1] * spacing[1], centre[0] * spacing[2]
        nodules.append(
            {"seriesuid": uid, "coordX": x, "coordY": y, "coordZ": z, "diameter_mm": 2 * radius_mm}
        )
    write_json(root / "index.json", {"cases": entries})
    write_json(
        root / "plan.json",
        {**PROCESSED_PLAN, "body_threshold_hu": -500.0, "crop_margin_mm": 5.0},
    )
    pd.DataFrame(nodules).to_csv(root / "nodules.csv", index=False)
    return root


def tiny_net(seed: int = 0, cfg: dict | None = None):
    """A random-init tiny BasicUNet whose final bias is set so about half the pixels are nodule.

    Half foreground makes the parity Dice a real test (two empty masks would agree trivially).
    """
    import torch

    from ctpipe.model import nets

    cfg = cfg or TINY_NET
    torch.manual_seed(seed)
    net = nets.build_network(cfg).eval()
    x = torch.randn(2, nets.in_channels(cfg), 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits = net(x)
        net.final_conv.bias[1] -= (logits[:, 1] - logits[:, 0]).median()
    return net


def make_checkpoint(path: Path, seed: int = 0) -> Path:
    """A checkpoint of :func:`tiny_net` as train writes one, for :func:`make_processed` data."""
    import torch

    from ctpipe import config

    train = config.validate(tiny_params()).train.model_dump()
    torch.save(
        {
            "state_dict": tiny_net(seed).state_dict(),
            "train_params": config.Train(**{**train, **TINY_NET, "epochs": 1}).model_dump(),
            "plan": copy.deepcopy(PROCESSED_PLAN),
            "seed": seed,
            "epoch": 0,
        },
        path,
    )
    return path


def make_onnx(path: Path, seed: int = 0) -> Path:
    """The fp32 ONNX export of :func:`make_checkpoint`'s network, as train writes models/model.onnx."""
    from ctpipe.deploy import onnx_export
    from ctpipe.model import nets

    onnx_export.export_onnx(tiny_net(seed), nets.in_channels(TINY_NET), path, onnx_export.OPSET)
    return path


def perturbed_copy(path: Path, out: Path, scale: float = 0.1) -> Path:
    """The ONNX model with relative noise of ``scale`` added to every convolution weight."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    rng = np.random.default_rng(1)
    for weight in (t for t in model.graph.initializer if len(t.dims) == 4):
        arr = numpy_helper.to_array(weight)
        noisy = arr * (1 + scale * rng.standard_normal(arr.shape)).astype(arr.dtype)
        weight.CopyFrom(numpy_helper.from_array(noisy, weight.name))
    onnx.save(model, str(out))
    return out


@pytest.fixture(scope="session")
def tiny_models() -> SimpleNamespace:
    """The tiny processed dataset and network helpers above, for module-scoped fixtures too:
    ``make_processed(root, test_offset=0.0)``, ``tiny_net(seed=0)``, ``make_checkpoint(path)``,
    ``make_onnx(path)`` (its ONNX export), ``perturbed_copy(onnx_path, out)``, and the constants
    ``net_params`` and ``spacing``."""
    return SimpleNamespace(
        make_processed=make_processed,
        tiny_net=tiny_net,
        make_checkpoint=make_checkpoint,
        make_onnx=make_onnx,
        perturbed_copy=perturbed_copy,
        net_params=TINY_NET,
        spacing=PROCESSED_SPACING,
    )


# A scratch repository with this project's pipeline, for the tests that run real DVC commands.
PIPELINE_FILES = [
    "ctpipe",
    "stages",
    "dvc.yaml",
    "params.yaml",
    "pyproject.toml",
    ".dvcignore",
    "data/synthetic",
]


def command_env(repo: Path) -> dict:
    """Environment of a DVC/git command in a scratch repository: this venv first on PATH, the
    scratch copy of ctpipe imported, no analytics, a git identity, and no de-identification key."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(repo),
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    env.pop("CTPIPE_DEID_KEY", None)
    return env


def make_tiny_repo(repo: Path) -> Path:
    """Copy the pipeline into ``repo`` with the tiny params; ``git init``, ``dvc init``, commit."""
    for name in PIPELINE_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, repo / name)
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    for cmd in (
        ["git", "init", "-q"],
        ["dvc", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "tiny pipeline"],
    ):
        subprocess.run(cmd, cwd=repo, env=command_env(repo), check=True, capture_output=True)
    return repo


@pytest.fixture(scope="session", name="make_tiny_repo")
def make_tiny_repo_factory():
    """``make_tiny_repo(folder)`` -> a committed scratch repository with the tiny pipeline."""
    return make_tiny_repo


@pytest.fixture(scope="session", name="command_env")
def command_env_factory():
    """``command_env(repo)`` -> the environment for DVC and git commands in a scratch repository."""
    return command_env


def make_tiny_package(root: Path) -> Path:
    """A model package as export writes it, around a random tiny network (mechanics, not skill)."""
    import torch

    from ctpipe import config, dicomio, prep
    from ctpipe.deploy import onnx_export, spec
    from ctpipe.model import nets
    from ctpipe.postprocessing.candidates import Chosen

    torch.manual_seed(0)
    onnx_export.export_onnx(
        nets.build_network(TINY_NET),
        nets.in_channels(TINY_NET),
        root / "model.onnx",
        onnx_export.OPSET,
    )
    shutil.copy(root / "model.onnx", root / "model_int8.onnx")
    write_tiny_cohort(root / "fp", n=1, seed=3)
    manifest = dicomio.scan_folder(root / "fp")
    ((uid, paths),) = dicomio.series_files(manifest).items()
    params = config.load(ROOT / "params.yaml")
    cfg = params.preprocess
    source = {"kind": "dicom", "index": 0, "paths": [str(root / "fp" / p) for p in paths]}
    plan = prep.make_plan([prep.fingerprint_case(source, synth.annotations_frame([]), cfg, 0)], cfg)
    inference = config.Inference(
        runtime="auto",
        whole_slab=True,
        roi_size=64,
        overlap=0.5,
        views=["axial", "coronal", "sagittal"],
        mirror_axes=[0, 1],
        min_candidate_mm3=1.0,
        lung_margin_mm=10.0,
    )
    chosen = Chosen(threshold=0.5, component_threshold=0.5, shape_weight=2.0)
    write_json(
        root / "input_spec.json",
        spec.input_spec({"train_params": TINY_NET}, plan, params.export, inference, chosen),
    )
    return root


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory) -> Path:
    """``make_tiny_package``: an exported package around a random tiny network, for predict."""
    return make_tiny_package(tmp_path_factory.mktemp("pkg"))


def make_density_package(root: Path, tiny: Path, threshold: float = 0.5) -> Path:
    """``tiny`` with a model that needs no training and always finds something: the foreground
    logit is ``8 * (centre channel - threshold)`` (dense tissue: nodules, vessels, the body wall)."""
    import onnx
    from onnx import TensorProto, helper

    shutil.copytree(tiny, root)
    c = TINY_NET["context_slices"]
    consts = {
        "starts": [c],
        "ends": [c + 1],
        "axes": [1],
    }
    nodes = [
        helper.make_node(
            "Constant", [], [k], value=helper.make_tensor(k, TensorProto.INT64, [1], v)
        )
        for k, v in consts.items()
    ]
    nodes += [
        helper.make_node(
            "Constant", [], ["t"], value=helper.make_tensor("t", TensorProto.FLOAT, [], [threshold])
        ),
        helper.make_node(
            "Constant", [], ["k"], value=helper.make_tensor("k", TensorProto.FLOAT, [], [8.0])
        ),
        helper.make_node(
            "Constant", [], ["z"], value=helper.make_tensor("z", TensorProto.FLOAT, [], [0.0])
        ),
        helper.make_node("Slice", ["input", "starts", "ends", "axes"], ["centre"]),
        helper.make_node("Sub", ["centre", "t"], ["shifted"]),
        helper.make_node("Mul", ["shifted", "k"], ["fg"]),
        helper.make_node("Mul", ["centre", "z"], ["bg"]),
        helper.make_node("Concat", ["bg", "fg"], ["logits"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "density",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 2 * c + 1, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2, "H", "W"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    for name in ("model.onnx", "model_int8.onnx"):
        onnx.save(model, root / name)
    return root


@pytest.fixture(scope="session")
def density_package(tmp_path_factory, tiny_package) -> Path:
    """``make_density_package``: a package whose predictions are never empty (serve, Orthanc)."""
    return make_density_package(tmp_path_factory.mktemp("density") / "pkg", tiny_package)


@pytest.fixture
def escape_guard(tmp_path, monkeypatch):
    """Deleting, moving or creating anything outside ``tmp_path`` raises PermissionError and is
    listed; the test fails if the list is not empty. Tests that feed values such as ``/`` or ``..``
    to code that deletes (as root) fail instead of damaging the machine when a check regresses."""
    root = os.path.realpath(tmp_path)
    escapes: list[str] = []

    def judged(op: str, real, position: int, through_links: bool):
        def call(*args, **kwargs):
            path = args[position] if len(args) > position else None
            text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else ""
            relative_to_fd = any(v is not None for k, v in kwargs.items() if k.endswith("dir_fd"))
            # a name relative to a folder fd (rmtree's own steps), a NUL, a folder that exists
            # (mkdir(..., exist_ok=True) of a parent): nothing to judge, the call does no harm
            exists = op == "mkdir" and text and os.path.lexists(text)
            if text and not relative_to_fd and "\x00" not in text and not exists:
                if through_links:  # what the call reaches
                    where = os.path.realpath(text)
                else:  # the entry itself: a link is judged where it lies, not where it leads
                    parent = os.path.realpath(os.path.dirname(text) or ".")
                    where = os.path.join(parent, os.path.basename(text))
                if not where.startswith(root + os.sep):
                    escapes.append(f"{op} {text}")
                    raise PermissionError(f"test guard: {op} outside the test folder: {text}")
            return real(*args, **kwargs)

        return call

    for module, name, position, through_links in [
        (shutil, "rmtree", 0, True),
        (shutil, "copyfile", 1, True),
        (os, "mkdir", 0, False),
        (os, "unlink", 0, False),
        (os, "remove", 0, False),
        (os, "rmdir", 0, False),
        (os, "replace", 1, False),
        (os, "rename", 1, False),
    ]:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, judged(name, real, position, through_links))
    yield escapes
    assert not escapes, f"escaped the test folder: {escapes}"


@pytest.fixture
def unreadable():
    """``with unreadable(*paths):`` the files or folders cannot be read in this thread: mode 000
    and, as root, without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (chmod alone does not stop
    root); both restored on exit. Skips where the capabilities cannot be dropped."""

    @contextlib.contextmanager
    def deny(*paths: Path):
        modes = {p: p.lstat().st_mode & 0o7777 for p in paths}
        for p in paths:
            p.chmod(0)
        restore = None
        try:
            if os.geteuid() == 0:
                restore = _drop_read_bypass()
            yield
        finally:
            if restore is not None:
                restore()
            for p, mode in modes.items():
                p.chmod(mode)

    return deny


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _drop_read_bypass():
    """Clear CAP_DAC_OVERRIDE (bit 1) and CAP_DAC_READ_SEARCH (bit 2) from this thread's effective
    capabilities (capset(2) acts on the calling thread); return the function that raises them
    again (they stay in the permitted set)."""
    libc = ctypes.CDLL(None, use_errno=True)
    header, caps = _CapHeader(0x20080522, 0), (_CapData * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capget(ctypes.byref(header), caps) != 0:
        pytest.skip("capget failed: cannot make a file unreadable for root")
    effective = caps[0].effective
    caps[0].effective = effective & ~0b110
    if libc.capset(ctypes.byref(header), caps) != 0:
        pytest.skip("capset failed: cannot make a file unreadable for root")

    def restore() -> None:
        caps[0].effective = effective
        if libc.capset(ctypes.byref(_CapHeader(0x20080522, 0)), caps) != 0:
            raise OSError(ctypes.get_errno(), "capset: could not restore the capabilities")

    return restore


@pytest.fixture(scope="session")
def rabbitmq(tmp_path_factory):
    """A RabbitMQ broker for the whole session (``tests/brokerkit.py``): ``.url``, ``.stop()``,
    ``.start()``; skipped with the install command where the package is missing."""
    import brokerkit

    if not brokerkit.available():
        pytest.skip(f"needs RabbitMQ: {brokerkit.INSTALL} (.ci/run does)")
    broker = brokerkit.Broker(tmp_path_factory.mktemp("rabbitmq"))
    try:
        yield broker.start()
    finally:
        broker.close()
