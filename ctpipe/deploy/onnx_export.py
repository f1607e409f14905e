"""ONNX export: the one path, taken once per pipeline run (the train stage's ``models/model.onnx``,
which postprocess, evaluate, quantize and export read).

:func:`export_onnx` runs ``torch.onnx.export(dynamo=True)`` with a pinned opset, input ``image``
``[N, C, H, W]`` and output ``logits`` ``[N, 2, H, W]``, batch and spatial dimensions dynamic (``H``
and ``W`` as multiples of :data:`SPATIAL_MULTIPLE`), one self-contained file. :func:`check_opset`
refuses a file of another opset than :data:`OPSET`; :func:`export_program` gives the
``torch.export`` program of the same shapes (the package's ``model.pt2``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ctpipe.fileio import atomic_path

log = logging.getLogger(__name__)

INPUT_NAME = "image"


OUTPUT_NAME = "logits"


# BasicUNet halves the image four times and concatenates skips without cropping, so H and W must
# be multiples of 2**4; the export states this in its dynamic shapes (16 * h, 16 * w).
SPATIAL_MULTIPLE = 16


# The example input has batch 2: torch.export specialises a dimension of size 1 to a constant.
EXPORT_BATCH = 2


OPSET = 18  # the one ONNX opset of every export (ONNX Runtime >= 1.14 and Triton read it)


def export_onnx(
    net: torch.nn.Module, channels: int, path: str | Path, opset: int, metadata: dict | None = None
) -> tuple[onnx.ModelProto, torch.export.ExportedProgram]:
    """Export ``net`` with the dynamo exporter to one self-contained ``.onnx`` file.

    Zero-padding ``Pad`` nodes (MONAI's odd-size guard in ``UpCat``, traced as constant zero
    pads) are removed: they copy every decoder tensor, and in a QDQ graph they keep ONNX Runtime
    from running the up-sampling in int8.

    Returns:
        The written model and the ``torch.export`` program it came from (for the ``.pt2``).
    """
    net = net.eval()
    example, dynamic_shapes = _example(channels)
    with torch.no_grad():
        program = torch.onnx.export(
            net,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamo=True,
            opset_version=int(opset),
            dynamic_shapes=dynamic_shapes,
            external_data=False,
            verbose=False,
        )
    model = program.model_proto
    strip_debug_metadata(model)
    removed = strip_noop_pads(model)
    log.info("exported opset %d, removed %d zero Pad nodes", opset, removed)
    for key, value in (metadata or {}).items():
        model.metadata_props.add(
            key=str(key), value=value if isinstance(value, str) else json.dumps(value)
        )
    save_model(model, path)
    onnx.checker.check_model(str(path), full_check=True)
    return model, program.exported_program


def _example(channels: int) -> tuple[torch.Tensor, tuple[dict]]:
    """The example input of an export and its dynamic shapes: batch, ``16 * h`` and ``16 * w``."""
    batch = torch.export.Dim("batch", min=1)
    h, w = torch.export.Dim("h", min=1), torch.export.Dim("w", min=1)
    size = 4 * SPATIAL_MULTIPLE
    example = torch.randn(
        EXPORT_BATCH, channels, size, size, generator=torch.Generator().manual_seed(0)
    )
    return example, ({0: batch, 2: SPATIAL_MULTIPLE * h, 3: SPATIAL_MULTIPLE * w},)


def export_program(net: torch.nn.Module, channels: int) -> torch.export.ExportedProgram:
    """``torch.export`` of ``net`` as :func:`export_onnx` captures it (for a ``.pt2``): the same
    example and dynamic shapes, and the settings of ``torch.onnx.export(dynamo=True)``'s
    non-strict capture, size-oblivious sizes among them, without which the program is
    specialised to ``h, w != 1`` and refuses 16-pixel slabs."""
    example, dynamic_shapes = _example(channels)
    with torch.no_grad(), torch.fx.experimental._config.patch(backed_size_oblivious=True):
        return torch.export.export(
            net.eval(),
            (example,),
            dynamic_shapes=dynamic_shapes,
            strict=False,
            prefer_deferred_runtime_asserts_over_guards=True,
        )


def save_model(model: onnx.ModelProto, path: str | Path) -> None:
    """Write ``model`` as one file (no external data), atomically."""
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp), save_as_external_data=False)


def strip_debug_metadata(model: onnx.ModelProto) -> None:
    """Drop the exporter's debugging metadata: stack traces with this checkout's absolute paths,
    and a range-constraints text whose order follows Python's hash seed. Without them the same
    weights give the same bytes wherever and whenever they are exported (DVC hashes the file)."""

    def clear(graph: onnx.GraphProto) -> None:
        del graph.metadata_props[:]
        for value in [*graph.input, *graph.output, *graph.value_info]:
            del value.metadata_props[:]
        for node in graph.node:
            del node.metadata_props[:]
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    clear(attribute.g)
                for sub in attribute.graphs:
                    clear(sub)

    del model.metadata_props[:]
    clear(model.graph)
    for function in model.functions:
        del function.metadata_props[:]
        for node in function.node:
            del node.metadata_props[:]


def strip_noop_pads(model: onnx.ModelProto) -> int:
    """Remove ``Pad`` nodes whose pads are a constant all-zero initializer; return how many."""
    inits = {t.name: t for t in model.graph.initializer}
    graph_outputs = {o.name for o in model.graph.output}
    rename: dict[str, str] = {}
    kept = []
    for node in model.graph.node:
        pads = inits.get(node.input[1]) if node.op_type == "Pad" and len(node.input) > 1 else None
        zero = pads is not None and not np.any(numpy_helper.to_array(pads))
        if zero and node.output[0] not in graph_outputs:
            rename[node.output[0]] = rename.get(node.input[0], node.input[0])
            continue
        kept.append(node)
    for node in kept:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    used = {name for node in kept for name in node.input}
    unused = [t for t in model.graph.initializer if t.name not in used]
    for t in unused:
        model.graph.initializer.remove(t)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return len(rename)


def onnx_opset(path: str | Path) -> int:
    """The default-domain opset of an ONNX file."""
    model = onnx.load(str(path), load_external_data=False)
    return next(int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx"))


def check_opset(path: str | Path) -> int:
    """:data:`OPSET`, after checking that ``path`` has it.

    Raises:
        ValueError: naming the file, its opset and the one expected.
    """
    found = onnx_opset(path)
    if found != OPSET:
        raise ValueError(f"{path}: ONNX opset {found}, expected {OPSET} (export it again)")
    return found


def quiet_exporter_logs() -> None:
    """The dynamo exporter's passes log every rewrite at INFO; keep the stage log readable."""
    for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export"):
        logging.getLogger(name).setLevel(logging.WARNING)
