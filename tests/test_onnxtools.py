"""ONNX export round trip, the parity gate, slab sampling, checksums and INT8 helpers (CPU, tiny)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from ctpipe import runenv
from ctpipe.deploy import onnx_export, package, parity, quant, sessions
from ctpipe.evaluation import overlap
from ctpipe.model import nets
from ctpipe.model.infer import onnx_predictor


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_models) -> tuple[torch.nn.Module, Path]:
    net = tiny_models.tiny_net()
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    onnx_export.export_onnx(net, nets.in_channels(tiny_models.net_params), path, onnx_export.OPSET)
    return net, path


def test_export_is_one_file_with_named_dynamic_io(exported):
    _, path = exported
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]  # no .onnx.data
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert onnx_export.onnx_opset(path) == 18 == onnx_export.check_opset(path)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, out.name) == ("image", "logits")
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims[1] == 3 and all(isinstance(d, str) and d for d in (dims[0], dims[2], dims[3]))
    assert "Pad" not in {n.op_type for n in model.graph.node}


def test_check_opset_refuses_another_opset_by_name(exported, tmp_path):
    _, path = exported
    model = onnx.load(str(path))
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = 17
    onnx.save(model, str(tmp_path / "old.onnx"))
    with pytest.raises(
        ValueError, match=rf"old\.onnx: ONNX opset 17, expected {onnx_export.OPSET}"
    ):
        onnx_export.check_opset(tmp_path / "old.onnx")


def test_export_program_matches_the_network_at_other_shapes(exported):
    net, _ = exported
    module = onnx_export.export_program(net, 3).module()
    x = torch.from_numpy(
        np.random.default_rng(0).standard_normal((3, 3, 48, 80)).astype(np.float32)
    )
    with torch.no_grad():
        np.testing.assert_allclose(module(x).numpy(), net(x).numpy(), atol=1e-5)


def test_roundtrip_onnxruntime_matches_pytorch(exported):
    net, path = exported
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal(s).astype(np.float32) for s in ((1, 3, 48, 80), (2, 3, 64, 32))]
    figures = parity.parity_figures(
        parity.module_predictor(net),
        onnx_predictor(sessions.ort_session(path, threads=1)),
        batches,
        0.5,
    )
    assert [s["shape"] for s in figures["shapes"]] == [[1, 3, 48, 80], [2, 3, 64, 32]]
    assert figures["foreground_voxels"] > 0.2 * sum(
        b.shape[0] * b.shape[2] * b.shape[3] for b in batches
    )
    assert figures["max_abs_diff"] < 1e-4
    checked = parity.assert_parity(figures, atol=1e-4, min_dice=0.999, what="tiny")
    assert checked["passed"] and checked["dice_min"] >= 0.999


def test_parity_gate_raises_on_perturbed_model(exported, tmp_path, tiny_models):
    net, path = exported
    bad = tiny_models.perturbed_copy(path, tmp_path / "bad.onnx")
    batches = [np.random.default_rng(0).standard_normal((2, 3, 32, 48)).astype(np.float32)]
    figures = parity.parity_figures(
        parity.module_predictor(net),
        onnx_predictor(sessions.ort_session(bad, threads=1)),
        batches,
        0.5,
    )
    with pytest.raises(parity.ParityError, match="parity gate failed"):
        parity.assert_parity(figures, atol=1e-3, min_dice=0.999, what="perturbed")
    # The Dice limit alone also trips: only the logit tolerance relaxed.
    with pytest.raises(parity.ParityError):
        parity.assert_parity(figures, atol=1e9, min_dice=0.999, what="perturbed")


def test_strip_noop_pads_removes_only_zero_pads():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])
    zero = numpy_helper.from_array(np.zeros(8, dtype=np.int64), "zero")
    one = numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64), "one")
    graph = helper.make_graph(
        [
            helper.make_node("Pad", ["x", "zero"], ["a"], mode="edge"),
            helper.make_node("Relu", ["a"], ["b"]),
            helper.make_node("Pad", ["b", "one"], ["y"], mode="edge"),
        ],
        "g",
        [x],
        [y],
        [zero, one],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    original = onnx.ModelProto()
    original.CopyFrom(model)
    assert onnx_export.strip_noop_pads(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Relu", "Pad"]
    assert model.graph.node[0].input[0] == "x"
    assert [t.name for t in model.graph.initializer] == ["one"]
    onnx.checker.check_model(model, full_check=True)
    x_in = {"x": np.array([[[[-1.0, 2.0], [3.0, -4.0]]]], dtype=np.float32)}
    before, after = (
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, x_in
        )[0]
        for m in (original, model)
    )
    np.testing.assert_array_equal(before, after)


def test_sample_slabs_shapes_and_split(tmp_path, tiny_models):
    processed = tiny_models.make_processed(tmp_path / "processed", test_offset=100.0)
    batches = parity.sample_slabs(processed, "train", 1, [(3, 32, 16), (2, 80, 48)], seed=0)
    assert [b.shape for b in batches] == [(3, 3, 32, 16), (2, 3, 80, 48)]  # 80 > 64 rows: padded
    assert all(b.dtype == np.float32 and b.max() < 50 for b in batches)  # never the test case
    test = parity.sample_slabs(processed, "test", 1, [(2, 32, 32)], seed=0)[0]
    assert test.min() > 50
    again = parity.sample_slabs(processed, "train", 1, [(3, 32, 16), (2, 80, 48)], seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))  # seeded
    with pytest.raises(ValueError, match="no cases in split"):
        parity.sample_slabs(processed, "nope", 1, [(1, 16, 16)], seed=0)


def test_sha256sums_verify_and_detect_tampering(tmp_path):
    root = tmp_path / "pkg"
    (root / "triton" / "m" / "1").mkdir(parents=True)
    (root / "a.json").write_text("{}\n")
    (root / "triton" / "m" / "1" / "model.onnx").write_bytes(b"\x00\x01binary")
    package.write_sha256sums(root)
    listed = (root / "SHA256SUMS").read_text().splitlines()
    assert [ln.split("  ")[1] for ln in listed] == ["a.json", "triton/m/1/model.onnx"]
    assert package.verify_sha256sums(root) == []
    if shutil.which("sha256sum"):
        assert (
            subprocess.run(
                ["sha256sum", "-c", "SHA256SUMS"], cwd=root, capture_output=True, check=False
            ).returncode
            == 0
        )
    (root / "a.json").write_text('{"x": 1}\n')
    (root / "extra.txt").write_text("new")
    assert package.verify_sha256sums(root) == ["a.json", "extra.txt"]
    if shutil.which("sha256sum"):
        assert (
            subprocess.run(
                ["sha256sum", "-c", "SHA256SUMS"], cwd=root, capture_output=True, check=False
            ).returncode
            != 0
        )


def test_triton_config_dynamic_dims():
    text = package.triton_config("seg", 5, 16)
    assert 'platform: "onnxruntime_onnx"' in text and "max_batch_size: 16" in text
    assert package.triton_config("seg", 5) == text  # TRITON_MAX_BATCH_SIZE, the former param
    assert "dims: [ 5, -1, -1 ]" in text and "dims: [ 2, -1, -1 ]" in text
    assert 'name: "image"' in text and 'name: "logits"' in text


def test_latency_and_machine_info():
    lat = quant.latency_ms(lambda: sum(range(100)), warmup=1, runs=5)
    assert lat["runs"] == 5 and 0 <= lat["median_ms"] <= lat["p90_ms"]
    info = runenv.cpu_info()
    assert info["cpus_available"] >= 1 and set(info["isa_flags"]) <= set(runenv.ISA_FLAGS)
    assert {"torch", "onnx", "onnxruntime", "python", "opset"} <= set(package.versions(18))


def test_pooled_dice_and_selection():
    masks = [np.array([[[1, 0], [1, 0]]]), np.zeros((1, 2, 2))]
    labels = [np.array([[[1, 0], [0, 1]]]), np.zeros((1, 2, 2))]
    assert overlap.pooled_dice(masks, labels) == pytest.approx(2 * 1 / (2 + 2))
    # A false positive in the nodule-free case counts against the pooled figure.
    assert overlap.pooled_dice([masks[0], np.ones((1, 2, 2))], labels) == pytest.approx(
        2 * 1 / (6 + 2)
    )
    assert overlap.pooled_dice([np.zeros(3)], [np.zeros(3)]) == 1.0
    configs = [
        {"name": "a", "dice": 0.80, "dice_drop": 0.02, "latency_ms": 1.0},
        {"name": "b", "dice": 0.81, "dice_drop": 0.005, "latency_ms": 3.0},
        {"name": "c", "dice": 0.805, "dice_drop": 0.008, "latency_ms": 2.0},
    ]
    assert quant.select(configs, 0.01, "fastest")["name"] == "c"
    assert quant.select(configs, 0.01, "accurate")["name"] == "b"
    assert quant.select(configs, 0.001, "fastest") is None
    with pytest.raises(ValueError, match="unknown rule"):
        quant.select(configs, 0.01, "cheapest")
