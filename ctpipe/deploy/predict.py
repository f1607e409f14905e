"""Run the exported model on a new DICOM study: ``python -m ctpipe.predict STUDY_DIR OUT_DIR``.

Needs only the model package (``models/export``), ONNX Runtime, NumPy, SimpleITK, pydicom,
highdicom and pydantic (the package's ``inference`` settings are checked as ``params.yaml``'s are):
no PyTorch. For every CT series in STUDY_DIR it applies the preprocessing that
``input_spec.json`` states (resample, body crop, intensity normalisation), runs the network on
whole slabs (or sliding windows, as the spec says) over the views and mirrored passes it names, and writes to
``OUT_DIR/<SeriesInstanceUID>/``:

    mask.nii.gz   nodule mask resampled back onto the series' own grid (nearest neighbour)
    record.json   acquisition, intensity and output features, no PHI (ctpipe.monitor's input)
    seg.dcm       the same mask as a DICOM Segmentation (highdicom) referencing the source series
    sr.dcm        the nodules as a DICOM SR (Comprehensive 3D SR, TID 1500 measurement report):
                  per nodule its centre, diameter, volume and score, referencing seg.dcm
    nodules.csv   detected nodules: world coordinates (LPS mm), equivalent diameter, score (the
                  peak probability discounted by elongation, ``shape_weight`` of the spec), peak,
                  elongation, volume; with a candidate classifier in the package (``classifier``
                  of the spec) also its probability ``classifier`` and the segmentation's score
                  ``seg_score``, the score being both combined; with a malignancy model
                  (``malignancy`` of the spec) its probability ``malignancy``

Every series of the study is considered (a study folder may hold a localizer, several
reconstructions, a dose report, secondary captures): each CT image series the model can work on is
predicted, every other one is skipped or refused with its reason (the rule is ``accepted_input``
of ``input_spec.json``; finer spacings than training are resampled, much coarser ones and partial
scans are refused). ``OUT_DIR/summary.json`` lists every series and every unused file with what
happened to it. A series' folder appears complete or not at all. Exit status: 0 when at least one
series was predicted, 2 when none was.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import SimpleITK as sitk
from pydantic import ValidationError

from ctpipe import dicomio, intensity, malignancy, prep
from ctpipe.config import Inference
from ctpipe.deploy import report
from ctpipe.deploy.window import predict_probability
from ctpipe.fileio import read_json, umask, write_csv, write_json
from ctpipe.geometry import Geometry
from ctpipe.model.views import lung_roi
from ctpipe.monitor.record import append as append_record
from ctpipe.monitor.record import series_record
from ctpipe.postprocessing.candidates import Chosen
from ctpipe.postprocessing.crops import combine, cut_crops
from ctpipe.safepath import UnsafePath, inside, uid_component, uid_reason

log = logging.getLogger("predict")


class RefusedSeries(ValueError):
    """The series is outside what the model was trained for."""


# SOP classes predict reads as a CT volume: CT Image Storage and Enhanced CT Image Storage.
IMAGE_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1")


def check_series(spec: dict, first: pydicom.Dataset, geom: Geometry, shape: tuple) -> None:
    """Refuse what the model cannot work on (``accepted_input`` of the spec, see its ``rule``)."""
    accepted = spec.get("accepted_input", {})
    modality = str(first.get("Modality", ""))
    if modality not in accepted.get("modalities", ["CT"]):
        raise RefusedSeries(f"modality {modality or 'missing'}: the model was trained on CT only")
    sop_class = str(first.get("SOPClassUID", ""))
    if sop_class not in IMAGE_SOP_CLASSES:
        name = pydicom.uid.UID(sop_class).name if sop_class else "missing"
        raise RefusedSeries(f"SOP class {name}: not a CT image series")
    image_type = [str(v).upper() for v in (first.get("ImageType") or [])]
    if "LOCALIZER" in image_type:
        raise RefusedSeries("a localizer (ImageType LOCALIZER), not a volume")
    if "max_spacing_mm" in accepted:
        coarsest = np.asarray(accepted["max_spacing_mm"], dtype=float)
    else:  # packages written before the rule: twice the coarsest training spacing
        coarsest = 2 * np.asarray(accepted.get("spacing_range_mm", [0, [np.inf] * 3])[1], float)
    if np.any(geom.spacing > coarsest):
        raise RefusedSeries(
            f"spacing {np.round(geom.spacing, 2).tolist()} mm is coarser than the model can "
            f"work on ({coarsest.tolist()} mm at most)"
        )
    extent = float(geom.spacing[2]) * (int(shape[0]) - 1)
    if extent < float(accepted.get("min_extent_mm", 0.0)):
        raise RefusedSeries(
            f"covers {extent:.0f} mm along the slice normal, less than the "
            f"{accepted['min_extent_mm']:g} mm of a chest CT the model needs"
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


def write_seg(
    path: Path,
    sources: list[pydicom.Dataset],
    mask: np.ndarray,
    uid: report.UidMaker | None = None,
) -> None:
    """A binary DICOM Segmentation of ``mask`` (frames in the order of ``sources``); ``uid``
    makes its UIDs (:func:`ctpipe.deploy.report.uid_maker`; default: random ones)."""
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
        series_instance_uid=(uid or report.uid_maker())("seg series"),
        series_number=900,
        sop_instance_uid=(uid or report.uid_maker())("seg instance"),
        instance_number=1,
        manufacturer="ctpipe",
        manufacturer_model_name="ctpipe nodule segmentation",
        software_versions="0.1.0",
        device_serial_number="0",
        omit_empty_frames=False,
    )
    seg.save_as(path)


def inference_settings(spec: dict, source: Path) -> Inference:
    """The ``inference`` params the package was exported with, checked as ``params.yaml``'s are.

    Raises:
        ValueError: naming ``source`` and every wrong key (a package exported before these
            settings were written whole: export it again).
    """
    try:
        return Inference.model_validate(spec.get("inference"))
    except ValidationError as exc:
        wrong = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'inference'}: {e['msg']}"
            for e in exc.errors(include_url=False)
        )
        raise ValueError(
            f"{source}: inference settings: {wrong} (export the model again)"
        ) from None


def prepare_volume(spec: dict, hu: np.ndarray, geom: Geometry, inference: Inference):
    """The package's preprocessing of one series: resampled, body-cropped, normalised volume,
    its geometry and the lungs' box to predict (None: the whole volume)."""
    pre = spec["preprocessing"]
    resampled, rgeom = prep.resample(
        hu, geom, np.asarray(pre["target_spacing_mm_xyz"]), pre["interpolation"]
    )
    cropped, cgeom, _ = prep.crop_to_body(
        resampled, rgeom, pre["body_crop"]["threshold_hu"], pre["body_crop"]["margin_mm"]
    )
    volume = intensity.normalise(cropped, pre["normalization"])
    box = lung_roi(
        volume,
        {"body_threshold_hu": pre["body_crop"]["threshold_hu"], **pre},
        cgeom.spacing[::-1],
        inference.lung_margin_mm,
    )
    return volume, cgeom, box


def package_post_processing(spec: dict, package: Path) -> Chosen:
    """The chosen post-processing of a package's ``input_spec.json``. Packages written before
    ``component_threshold`` and ``shape_weight`` threshold plainly and score by the peak; one that
    turns on the deleted large-component rule is refused (:meth:`Chosen.from_mapping`)."""
    post = spec["postprocessing"]
    defaults = {"component_threshold": post.get("threshold"), "shape_weight": 0.0}
    return Chosen.from_mapping(
        {**defaults, **post}, f"{package / 'input_spec.json'}: 'postprocessing'"
    )


def classify_nodules(
    second: dict, package: Path, volume: np.ndarray, geom: Geometry, nodules
) -> pd.DataFrame:
    """``nodules`` with ``seg_score`` (the segmentation's score), ``classifier`` (the probability of
    the package's ``classifier.onnx`` on each nodule's crop of ``volume``, the preprocessed
    volume on ``geom``) and ``score`` (:func:`ctpipe.postprocessing.crops.combine` with the
    spec's ``weight``), sorted by ``score``."""
    import onnxruntime as ort

    shape = tuple(int(n) for n in second["crop_shape_kji"])
    xyz = nodules[["coordX", "coordY", "coordZ"]].to_numpy(np.float64)
    crops = cut_crops(volume, geom, xyz, shape).astype(np.float32)[:, None]
    prob = np.zeros(len(nodules))
    if len(nodules):
        session = ort.InferenceSession(
            str(package / second["file"]), providers=["CPUExecutionProvider"]
        )
        logits = session.run(None, {session.get_inputs()[0].name: crops})[0][:, 0]
        prob = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    out = nodules.assign(seg_score=nodules["score"], classifier=prob)
    out["score"] = combine(out["seg_score"], prob, float(second["weight"]))
    return out.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)


def rate_nodules(
    spec: dict, package: Path, volume: np.ndarray, geom: Geometry, nodules: pd.DataFrame
) -> pd.DataFrame:
    """``nodules`` with ``malignancy``: the probability of the package's malignancy model
    (:mod:`ctpipe.malignancy`) from each nodule's figures on ``volume`` (preprocessed, on
    ``geom``)."""
    model = malignancy.MalignancyModel.from_dict(
        spec["malignancy"], f"{package / 'input_spec.json'}: 'malignancy'"
    )
    feats = malignancy.features(volume, geom, nodules, spec["preprocessing"]["normalization"])
    return nodules.assign(malignancy=model.probability(feats) if len(nodules) else [])


def predict_series(
    paths: list[Path], package: Path, model: str, out: Path, uid_seed: str | None = None
) -> dict:
    """Run the whole chain on one sorted series into ``out/<SeriesInstanceUID>``; return a summary.

    ``uid_seed``: the SEG's and SR's UIDs derive from it and the series (the same seed gives the
    same objects, see :func:`ctpipe.deploy.report.uid_maker`); None: random UIDs. The outputs
    are written to a temporary folder next to it and moved into place when complete, so a
    failure leaves no partial folder.

    Raises:
        UnsafePath: the SeriesInstanceUID is not a DICOM UID, or ``out/<uid>`` leads out of
            ``out`` (a symbolic link): nothing is written.
    """
    import onnxruntime as ort

    start = time.perf_counter()
    spec = read_json(package / "input_spec.json")
    inference = inference_settings(spec, package / "input_spec.json")
    # Headers only (the pixels are read once, by read_series), with the missing Type 2 patient
    # and study attributes made present and empty: headers as they come still give a SEG and SR.
    sources = [report.add_type2(pydicom.dcmread(p, stop_before_pixels=True)) for p in paths]
    uid = uid_component(str(sources[0].SeriesInstanceUID))  # names the output folder
    inside(out, out / uid)  # refused before any work
    hu, geom = dicomio.read_series(paths)
    check_series(spec, sources[0], geom, hu.shape)
    volume, cgeom, box = prepare_volume(spec, hu, geom, inference)
    session = ort.InferenceSession(
        str(package / ("model.onnx" if model == "fp32" else "model_int8.onnx")),
        providers=["CPUExecutionProvider"],
    )
    prob = predict_probability(
        session,
        volume,
        int(spec["context_slices"]),
        inference.roi_size,
        inference.overlap,
        views=inference.views,
        mirror_axes=inference.mirror_axes,
        whole_slab=inference.whole_slab,
        box=box,
    )
    # One labelling gives both the mask and the nodules listed: each row is one mask component.
    chosen = package_post_processing(spec, package)
    found, nodules = chosen.find_nodules(prob, cgeom, inference.min_candidate_mm3)
    mask = back_to_source(found, cgeom, hu, geom)
    nodules = nodules[nodules["detected"]].drop(columns="detected").assign(seriesuid=uid)
    if "classifier" in spec:  # the candidate classifier's probability, and the score with it
        nodules = classify_nodules(spec["classifier"], package, volume, cgeom, nodules)
    if "malignancy" in spec:  # the malignancy model's probability per nodule
        nodules = rate_nodules(spec, package, volume, cgeom, nodules)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{uid}.", dir=out))
    try:
        sitk.WriteImage(geom.apply_to(sitk.GetImageFromArray(mask)), str(tmp / "mask.nii.gz"))
        make = report.uid_maker(None if uid_seed is None else f"{uid_seed}/{uid}")
        write_seg(tmp / "seg.dcm", sources, mask, make)
        report.write_sr(tmp / "sr.dcm", sources, pydicom.dcmread(tmp / "seg.dcm"), nodules, make)
        write_csv(tmp / "nodules.csv", nodules.round(3))
        record = series_record(
            sources[0], hu, geom.spacing, nodules, time.perf_counter() - start, model
        )
        write_json(tmp / "record.json", record)  # no PHI: ctpipe.monitor's input
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700; the folder follows the umask
        dest = inside(out, out / uid)  # again: the folder may have changed during the prediction
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"nodules": len(nodules), "mask_voxels": int(mask.sum()), "slices": len(paths)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ctpipe.predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("study_dir", type=Path, help="folder with the DICOM files of one study")
    parser.add_argument(
        "out_dir", type=Path, help="where to write <series>/{mask.nii.gz,seg.dcm,nodules.csv}"
    )
    parser.add_argument("--model", choices=["fp32", "int8"], default="fp32")
    parser.add_argument(
        "--package", type=Path, default=Path("models/export"), help="exported model package"
    )
    parser.add_argument(
        "--records", type=Path, help="also append each series' record.json here (ctpipe.monitor)"
    )
    parser.add_argument(
        "--queue",
        metavar="URL",
        help="amqp(s)://USER@HOST:PORT/VHOST: submit every series of STUDY_DIR (an archive) to "
        "the workers of a RabbitMQ broker instead of predicting here (docs/serving.md)",
    )
    parser.add_argument(
        "--password-env",
        metavar="NAME",
        help="--queue: environment variable with USER's password (never in the URL)",
    )
    parser.add_argument(
        "--queue-name", default="ctpipe.jobs", help="--queue: the workers' queue.name"
    )
    return parser.parse_args(argv)


def unused_files(manifest) -> tuple[dict[str, dict], list[dict]]:
    """Series skipped by the checks of :func:`ctpipe.dicomio.check_series` (by series) and files
    that belong to no series (not DICOM, no pixel data, ...), each with its reason."""
    skipped = manifest[manifest["status"] != "ok"]
    series: dict[str, dict] = {}
    for uid, group in skipped[skipped["series_uid"].notna()].groupby("series_uid", sort=True):
        series[str(uid)] = {
            "status": "skipped",
            "reason": str(group["reason"].iloc[0]),
            "files": len(group),
        }
    loose = skipped[skipped["series_uid"].isna()]
    files = [{"path": str(r["path"]), "reason": str(r["reason"])} for _, r in loose.iterrows()]
    return series, files


def predict_study(
    study_dir: Path,
    package: Path,
    model: str,
    out_dir: Path,
    records_dir: Path | None = None,
    uid_seed: str | None = None,
) -> dict:
    """Every series of ``study_dir``: predicted into ``out_dir/<SeriesInstanceUID>/``, or skipped,
    refused or failed with its reason; returns the summary (also ``out_dir/summary.json``). Each
    predicted series' ``record.json`` is also appended to ``records_dir`` (drift monitoring);
    ``uid_seed``: see :func:`predict_series`."""
    spec = read_json(package / "input_spec.json")
    # A package predict cannot follow is refused at once.
    inference_settings(spec, package / "input_spec.json")
    package_post_processing(spec, package)
    accepted = spec.get("accepted_input", {})
    manifest = dicomio.scan_folder(study_dir, modalities=tuple(accepted.get("modalities", ["CT"])))
    report, files = unused_files(manifest)
    for uid, entry in report.items():
        log.warning("series %s skipped: %s", uid, entry["reason"])
    for entry in files:
        log.warning("not used: %s: %s", entry["path"], entry["reason"])
    for uid, rel in dicomio.series_files(manifest).items():
        paths = [study_dir / p for p in rel]
        report[uid] = predict_entry(uid, paths, package, model, out_dir, records_dir, uid_seed)
    return write_summary(study_dir, model, report, files, out_dir)


def write_summary(
    study_dir: Path, model: str, report: dict, files: list[dict], out_dir: Path
) -> dict:
    """``out_dir/summary.json`` of :func:`predict_study` (also of the retrospective run)."""
    predicted = sum(e["status"] == "predicted" for e in report.values())
    summary = {
        "study_dir": str(study_dir),
        "model": model,
        "predicted": predicted,
        "series": dict(sorted(report.items())),
        "unused_files": files,
    }
    write_json(inside(out_dir, out_dir / "summary.json"), summary)
    return summary


def predict_entry(
    uid: str,
    paths: list[Path],
    package: Path,
    model: str,
    out_dir: Path,
    records_dir: Path | None = None,
    uid_seed: str | None = None,
) -> dict:
    """One series of :func:`predict_study`: its summary entry, predicted, refused or failed."""
    try:
        if uid_reason(uid):  # it names the series' output folder: refused before any work
            raise RefusedSeries(f"SeriesInstanceUID: {uid_reason(uid)}")
        result = predict_series(paths, package, model, out_dir, uid_seed)
        if records_dir is not None:
            append_record(records_dir, read_json(out_dir / uid / "record.json"))
        log.info("series %s: %s", uid, result)
        return {"status": "predicted", "files": len(paths), **result}
    except (RefusedSeries, UnsafePath) as exc:
        log.error("series %s refused: %s", uid, exc)
        return {"status": "refused", "reason": str(exc), "files": len(paths)}
    except Exception as exc:  # noqa: BLE001 - one series' failure must not stop the others
        log.exception("series %s failed", uid)
        return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}", "files": len(paths)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = predict_study(args.study_dir, args.package, args.model, args.out_dir, args.records)
    if not summary["predicted"]:
        log.error(
            "%s: no series predicted (reasons in %s)", args.study_dir, args.out_dir / "summary.json"
        )
    return 0 if summary["predicted"] else 2


if __name__ == "__main__":
    sys.exit(main())
