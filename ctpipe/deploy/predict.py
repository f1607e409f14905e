"""Run the exported model on a new DICOM study: ``python -m ctpipe.predict STUDY_DIR OUT_DIR``.

Needs only the model package (``models/export``), ONNX Runtime, NumPy, SimpleITK, pydicom and
highdicom: no PyTorch. For every CT series in STUDY_DIR it applies the preprocessing that
``input_spec.json`` states (resample, body crop, intensity normalisation), runs sliding-window
inference with Gaussian blending over the views and mirrored passes the spec names, and writes to
``OUT_DIR/<SeriesInstanceUID>/``:

    mask.nii.gz   nodule mask resampled back onto the series' own grid (nearest neighbour)
    seg.dcm       the same mask as a DICOM Segmentation (highdicom) referencing the source series
    nodules.csv   detected nodules: world coordinates (LPS mm), equivalent diameter, score (the
                  peak probability discounted by elongation, ``shape_weight`` of the spec), peak,
                  elongation, volume

Series whose modality or geometry the model was not trained for are refused with the reason.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from ctpipe import dicomio, prep
from ctpipe.fileio import read_json, write_csv
from ctpipe.geometry import Geometry
from ctpipe.model.views import mean_over_views, slab_by_slab
from ctpipe.postprocessing.candidates import find_nodules

log = logging.getLogger("predict")


class RefusedSeries(ValueError):
    """The series is outside what the model was trained for."""


def gaussian_weights(roi: int) -> np.ndarray:
    """Blending weights of one window (sigma = roi / 8, as MONAI's and nnU-Net's default)."""
    x = np.arange(roi) - (roi - 1) / 2
    g = np.exp(-0.5 * (x / (roi * 0.125)) ** 2)
    w = np.outer(g, g)
    return np.maximum(w / w.max(), 1e-3).astype(np.float32)


def _starts(size: int, roi: int, step: int) -> list[int]:
    starts = list(range(0, max(size - roi, 0) + 1, step))
    if starts[-1] + roi < size:
        starts.append(size - roi)
    return starts


def sliding_window(run, x: np.ndarray, roi: int, overlap: float) -> np.ndarray:
    """Logits ``[n, classes, H, W]`` of ``x [n, C, H, W]``, windows of ``roi`` blended by a Gaussian."""
    n, _, h, w = x.shape
    ph, pw = max(roi - h, 0), max(roi - w, 0)
    xp = np.pad(
        x, ((0, 0), (0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)), mode="constant"
    )
    H, W = xp.shape[2:]
    step = max(int(roi * (1 - overlap)), 1)
    weights = gaussian_weights(roi)
    out, norm = None, np.zeros((H, W), np.float32)
    for i in _starts(H, roi, step):
        for j in _starts(W, roi, step):
            logits = run(np.ascontiguousarray(xp[:, :, i : i + roi, j : j + roi]))
            if out is None:
                out = np.zeros((n, logits.shape[1], H, W), np.float32)
            out[:, :, i : i + roi, j : j + roi] += logits * weights
            norm[i : i + roi, j : j + roi] += weights
    out /= norm
    return out[:, :, ph // 2 : ph // 2 + h, pw // 2 : pw // 2 + w]


def predict_probability(
    session,
    volume: np.ndarray,
    context: int,
    roi: int,
    overlap: float,
    batch_slices: int = 16,
    views=("axial",),
    mirror_axes=(),
) -> np.ndarray:
    """Foreground probability ``[K, H, W]`` of a normalised volume, with an ONNX Runtime session:
    the mean over ``views`` (:mod:`ctpipe.views`) of the slab-by-slab prediction along each, each
    slab also mirrored along ``mirror_axes``."""
    name = session.get_inputs()[0].name
    run = lambda x: session.run(None, {name: x.astype(np.float32)})[0]  # noqa: E731

    def window_prob(slabs: np.ndarray) -> np.ndarray:
        logits = sliding_window(run, slabs, roi, overlap)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e[:, 1] / e.sum(axis=1)

    return mean_over_views(
        volume,
        views,
        lambda seen: slab_by_slab(seen, context, batch_slices, mirror_axes, window_prob),
    )


def check_series(spec: dict, first: pydicom.Dataset, geom: Geometry) -> None:
    """Refuse what the model was not trained for: other modalities, spacings far off its range."""
    accepted = spec.get("accepted_input", {})
    modality = str(first.get("Modality", ""))
    if modality not in accepted.get("modalities", ["CT"]):
        raise RefusedSeries(f"modality {modality or 'missing'}: the model was trained on CT only")
    lo, hi = (np.asarray(v) for v in accepted.get("spacing_range_mm", [[0, 0, 0], [np.inf] * 3]))
    if np.any(geom.spacing < 0.5 * lo) or np.any(geom.spacing > 2 * hi):
        raise RefusedSeries(
            f"spacing {np.round(geom.spacing, 2).tolist()} mm is far outside the training "
            f"range {lo.tolist()}..{hi.tolist()} mm"
        )


def back_to_source(
    mask: np.ndarray, geom: Geometry, hu: np.ndarray, source: Geometry
) -> np.ndarray:
    """Resample a mask from the model grid onto the source series' grid (nearest neighbour)."""
    moving = geom.apply_to(sitk.GetImageFromArray(mask.astype(np.uint8)))
    reference = source.apply_to(sitk.GetImageFromArray(np.zeros(hu.shape, np.uint8)))
    return sitk.GetArrayFromImage(
        sitk.Resample(moving, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    )


def write_seg(path: Path, sources: list[pydicom.Dataset], mask: np.ndarray) -> None:
    """A binary DICOM Segmentation of ``mask`` (frames in the order of ``sources``)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Lung nodule",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Nodule,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="ctpipe", version="0.1.0", family=codes.cid7162.ArtificialIntelligence
        ),
    )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=mask.astype(bool),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=hd.UID(),
        series_number=900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="ctpipe",
        manufacturer_model_name="ctpipe nodule segmentation",
        software_versions="0.1.0",
        device_serial_number="0",
        omit_empty_frames=False,
    )
    seg.save_as(path)


def predict_series(paths: list[Path], package: Path, model: str, out: Path) -> dict:
    """Run the whole chain on one sorted series; return a summary."""
    import onnxruntime as ort

    spec = read_json(package / "input_spec.json")
    pre, inf, post = spec["preprocessing"], spec["inference"], spec["postprocessing"]
    sources = [pydicom.dcmread(p) for p in paths]
    hu, geom = dicomio.read_series(paths)
    check_series(spec, sources[0], geom)
    resampled, rgeom = prep.resample(
        hu, geom, np.asarray(pre["target_spacing_mm_xyz"]), pre["interpolation"]
    )
    cropped, cgeom, _ = prep.crop_to_body(
        resampled, rgeom, pre["body_crop"]["threshold_hu"], pre["body_crop"]["margin_mm"]
    )
    volume = prep.normalise(cropped, pre["normalization"])
    session = ort.InferenceSession(
        str(package / ("model.onnx" if model == "fp32" else "model_int8.onnx")),
        providers=["CPUExecutionProvider"],
    )
    prob = predict_probability(
        session,
        volume,
        int(spec["context_slices"]),
        int(inf["roi_size"]),
        float(inf["sliding_window_overlap"]),
        views=inf.get("views", ["axial"]),
        mirror_axes=inf.get("mirror_axes", []),
    )
    # One labelling gives both the mask and the nodules listed: each row is one mask component.
    found, nodules = find_nodules(
        prob,
        cgeom,
        float(post["threshold"]),
        float(post.get("component_threshold", post["threshold"])),
        float(post["min_candidate_mm3"]),
        float(post.get("shape_weight", 0.0)),
    )
    mask = back_to_source(found, cgeom, hu, geom)
    uid = str(sources[0].SeriesInstanceUID)
    folder = out / uid
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(geom.apply_to(sitk.GetImageFromArray(mask)), str(folder / "mask.nii.gz"))
    write_seg(folder / "seg.dcm", sources, mask)
    nodules = nodules[nodules["detected"]].drop(columns="detected")
    write_csv(folder / "nodules.csv", nodules.assign(seriesuid=uid).round(3))
    return {"series": uid, "nodules": len(nodules), "mask_voxels": int(mask.sum())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ctpipe.predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("study_dir", type=Path, help="folder with the DICOM files of one study")
    parser.add_argument(
        "out_dir", type=Path, help="where to write mask.nii.gz, seg.dcm, nodules.csv"
    )
    parser.add_argument("--model", choices=["fp32", "int8"], default="fp32")
    parser.add_argument(
        "--package", type=Path, default=Path("models/export"), help="exported model package"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    manifest = dicomio.scan_folder(
        args.study_dir,
        modalities=tuple(
            read_json(args.package / "input_spec.json")
            .get("accepted_input", {})
            .get("modalities", ["CT"])
        ),
    )
    series = dicomio.series_files(manifest)
    for _, row in manifest[manifest["status"] != "ok"].iterrows():
        log.warning("not used: %s: %s", row["path"], row["reason"])
    if not series:
        log.error("%s: no usable CT series (reasons above)", args.study_dir)
        return 2
    refused = 0
    for uid, rel in series.items():
        try:
            log.info(
                "%s",
                predict_series(
                    [args.study_dir / p for p in rel], args.package, args.model, args.out_dir
                ),
            )
        except RefusedSeries as exc:
            refused += 1
            log.error("series %s refused: %s", uid, exc)
    return 2 if refused == len(series) else 0


if __name__ == "__main__":
    sys.exit(main())
