"""``input_spec.json`` of the model package: how to feed the model and read its output.

What :mod:`ctpipe.deploy.predict` (and any other client) needs besides the graph: the input and
output tensors, the preprocessing of the training plan, the ``inference`` params as they were
(``config.Inference``, read back and checked by predict), the post-processing chosen on validation,
and the rule of which series the model accepts.
"""

from __future__ import annotations

from ctpipe.config import Export, Inference
from ctpipe.deploy import onnx_export
from ctpipe.model import nets
from ctpipe.postprocessing.candidates import Chosen

LABELS = {"0": "background", "1": "nodule"}

# What each key of ``input_spec.json``'s ``inference`` means, written next to it.
INFERENCE_MEANING = {
    "runtime": "where the pipeline's stages ran the network (auto: PyTorch on a CUDA GPU, else ONNX "
    "Runtime); predict always runs ONNX Runtime on the CPU",
    "whole_slab": "true: each slab goes through the network in one pass, zero-padded to multiples "
    f"of {onnx_export.SPATIAL_MULTIPLE} (roi_size and overlap unused); false: windows of roi_size "
    "at overlap, blended by a Gaussian, a slab smaller than the window zero-padded (MONAI "
    "sliding_window_inference)",
    "roi_size": "side of the sliding windows (pixels), with whole_slab false",
    "overlap": "overlap of the sliding windows, with whole_slab false",
    "views": "slab orientations the volume is also read along (axial: slabs of slices k, coronal: "
    "of rows j, sagittal: of columns i); the foreground probabilities are averaged",
    "mirror_axes": "test-time mirroring: each slab [C, H, W] is also predicted mirrored along every "
    "combination of these in-plane axes (0: rows H, 1: columns W), each prediction mirrored back, "
    "and the foreground probabilities averaged ([0, 1]: 4 passes per view; []: one)",
    "min_candidate_mm3": "components smaller than this (mm3) are neither candidates nor in the mask",
    "lung_margin_mm": "only the bounding box of the lungs (voxels at or below the body threshold "
    "inside the body, each slice's holes filled; pieces under 1 % of the largest left out), grown "
    "by this margin, is predicted; probability 0 outside it; null: the whole volume",
}


def input_spec(ckpt: dict, plan: dict, export: Export, inference: Inference, chosen: dict) -> dict:
    """How to feed the model and read its output, from the checkpoint, the plan, the params and
    the post-processing ``chosen`` on validation (:func:`ctpipe.postprocessing.choose.load`)."""
    tp = ckpt["train_params"]
    context = tp["context_slices"]
    return {
        "input": {
            "name": onnx_export.INPUT_NAME,
            "dtype": "float32",
            "layout": "NCHW",
            "shape": ["N", nets.in_channels(tp), "H", "W"],
            "channels": f"2.5D slab: slices k-{context}..k+{context} of the volume (edge slices "
            "replicated), centre slice in the middle channel",
            "spatial_multiple": onnx_export.SPATIAL_MULTIPLE,
            "dynamic": ["N", "H", "W"],
            "patch_size_train": tp["patch_size"],
        },
        "output": {
            "name": onnx_export.OUTPUT_NAME,
            "dtype": "float32",
            "shape": ["N", nets.NUM_CLASSES, "H", "W"],
            "meaning": "logits of the centre slice; no deep-supervision heads (BasicUNet has none)",
        },
        "context_slices": context,
        "label_map": LABELS,
        "preprocessing": {
            "target_spacing_mm_xyz": plan.get("target_spacing_mm"),
            "orientation": "native direction cosines kept (no reorientation); arrays indexed [k, j, i] "
            "= slice, row, column; resampled on the series' own grid",
            "interpolation": plan.get("interpolation"),
            "normalization": plan.get("normalization"),
            "normalization_formula": "(clip(HU, clip[0], clip[1]) - mean) / std",
            "body_crop": {
                "threshold_hu": plan.get("body_threshold_hu"),
                "margin_mm": plan.get("crop_margin_mm"),
            },
        },
        "inference": inference.model_dump(),
        "inference_meaning": INFERENCE_MEANING,
        "postprocessing": postprocessing_spec(chosen, inference.min_candidate_mm3),
        "deep_supervision": False,
        # What predict accepts: the modality and the range of acquisition spacings seen in training.
        "accepted_input": accepted_input(plan, export),
    }


def postprocessing_spec(chosen: Chosen, min_candidate_mm3: float) -> dict:
    """From probabilities to the nodule mask and the listed nodules."""
    return {
        "softmax": "over the class axis; foreground = channel 1",
        "threshold": chosen.threshold,
        "component_threshold": chosen.component_threshold,
        "connected_components": "26-connected, on the stacked 3D probability",
        "mask": "voxels >= threshold, in components of at least min_candidate_mm3 whose highest probability "
        "is >= component_threshold; the nodules listed are those components, one row each",
        "min_candidate_mm3": min_candidate_mm3,
        "chosen_on": "threshold, component_threshold, shape_weight chosen on the "
        "validation split after training (postprocess stage, models/postprocessing.json)",
        "shape_weight": chosen.shape_weight,
        "score": "each nodule's score is its peak probability p with the odds divided by its elongation e "
        "(sqrt of the largest over the smallest eigenvalue of its second moments in mm) to the power "
        "shape_weight: p / (p + (1 - p) * e ** shape_weight); shape_weight 0: the peak",
    }


def accepted_input(plan: dict, export: Export) -> dict:
    """What predict accepts: finer spacings than training are resampled to the plan; what the
    model cannot see (much coarser slices, a partial scan, another modality) is refused."""
    fingerprint = plan.get("fingerprint", {})
    coarsest = fingerprint.get("spacing_max", [1e9] * 3)
    return {
        "modalities": ["CT"],
        "max_spacing_mm": [round(export.max_spacing_factor * float(s), 3) for s in coarsest],
        "min_extent_mm": export.min_extent_mm,
        "training_spacing_range_mm": [fingerprint.get("spacing_min", [0.0] * 3), coarsest],
        "rule": "a CT series of any finer spacing is resampled to target_spacing_mm_xyz; it is refused "
        "when a spacing is coarser than max_spacing_mm (max_spacing_factor times the coarsest "
        "spacing seen in training), when it covers less than min_extent_mm along the slice normal, "
        "when it is a localizer or not an image of a listed modality, or when ingest's series checks "
        "fail (missing or duplicate slices, gantry tilt, mixed orientations)",
    }


def classifier_spec(model) -> dict:
    """How ``predict`` runs ``classifier.onnx`` (a :class:`ctpipe.classifier.CandidateClassifier`)."""
    return {
        "file": "classifier.onnx",
        "input": "crops [N, 1, k, j, i] float32 of the preprocessed (resampled, normalised) volume, "
        "centred on each nodule's centre (ctpipe.postprocessing.crops.cut_crops)",
        "crop_shape_kji": list(model.shape),
        "crop_mm": model.crop_mm,
        "output": "logit [N, 1]; the classifier's probability that the finding is a nodule is its "
        "sigmoid",
        "weight": model.weight,
        "score": "seg_score ** (1 - weight) * classifier ** weight: the nodule's score, with "
        "seg_score the segmentation's (postprocessing.score); weight chosen on validation by CPM",
    }
