"""The detected nodules as a DICOM Structured Report, next to ``predict``'s SEG and ``nodules.csv``.

:func:`write_sr` writes a Comprehensive 3D SR whose content is a TID 1500 Measurement Report
(highdicom): a device observer (ctpipe), procedure reported "CT of chest", and per nodule

* a TID 1411 volumetric ROI group that references segment 1 of the SEG (with the source series)
  and holds the measurements: diameter (SCT 81827009, ``mm``; the equivalent-sphere diameter),
  volume (SCT 118565006, ``mm3``) and the detection score as "Certainty of Finding"
  (DCM 111012, UCUM ``1``, a value in 0..1);
* a second TID 1411 group, with the same tracking identifier ("nodule N" and a UID), whose ROI is
  a volume surface of graphic type POINT at the nodule centre (world LPS mm, the frame of reference
  of the series), its geometric purpose "Center of Mass" (DCM 128138).

Both carry finding type Nodule (SCT 27925004) and finding site Lung (SCT 39607008). The centre has
a group of its own because highdicom allows exactly one ROI reference per volumetric group (here
the segment) and refuses spatial coordinates inside measurements of ROI groups; TID 1500 ties
groups that share a tracking UID to one finding. The SEG holds all nodules in its one segment, so
the segment reference alone does not say which component a row is: the centre does.

With the candidate classifier in the package, each nodule's group also holds the classifier's
probability that the finding is a nodule as "Probability" (DCM 122157, UCUM ``1``), and the score
is the combined one (``nodules.csv``: ``seg_score``, ``classifier``, ``score``).

Certainty of Finding is DICOM's concept for a CAD detector's likelihood that a finding is the
feature sought (a nodule), not its malignancy ("Probability of cancer", DCM 111047, would be wrong),
so no private coding scheme is needed. A report without nodules holds one TID 1501 group stating
"Presence of property" (DCM 121052) = Absent (SCT 272519000) for finding type Nodule, because TID
1500 (and highdicom) require at least one measurement group.

:func:`read_sr` reads such a report back, through highdicom's accessors, into one row per nodule.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pandas as pd
import pydicom
from pydicom.sr.codedict import codes

from ctpipe import __version__
from ctpipe.fileio import atomic_path

REPORT_COLUMNS = ["coordX", "coordY", "coordZ", "diameter_mm", "volume_mm3", "score"]

NODULE = codes.SCT.Nodule
LUNG = codes.SCT.Lung
CT_OF_CHEST = hd.sr.CodedConcept("169069000", "SCT", "CT of chest")
# Column of the nodule table -> (concept name, UCUM unit) of its NUM content item.
MEASUREMENTS = {
    "diameter_mm": (codes.SCT.Diameter, codes.UCUM.Millimeter),
    "volume_mm3": (codes.SCT.Volume, codes.UCUM.CubicMillimeter),
    "score": (codes.DCM.CertaintyOfFinding, codes.UCUM.NoUnits),
}
# Written when the table has the column (a package with the candidate classifier): the classifier's
# probability that the finding is a nodule, as "Probability" (DCM 122157, UCUM 1).
OPTIONAL_MEASUREMENTS = {
    "classifier": (codes.DCM.Probability, codes.UCUM.NoUnits),  # the candidate classifier's
    "malignancy": (codes.DCM.ProbabilityOfCancer, codes.UCUM.NoUnits),  # ctpipe.malignancy's
}
CENTRE_PURPOSE = codes.DCM.CenterOfMass
UidMaker = Callable[[str], str]  # what the UID is for -> a UID (see uid_maker)


def uid_maker(seed: str | None = None) -> UidMaker:
    """UIDs of the objects predict writes: new random ones without ``seed``; with it, the same
    UID for the same seed and purpose (``pydicom.uid.generate_uid`` over both), so that a job run
    twice (a redelivered message) writes the same SEG and SR, which a PACS then keeps once."""
    if seed is None:
        return lambda what: hd.UID()
    return lambda what: pydicom.uid.generate_uid(entropy_srcs=[seed, what])


# Type 2 attributes (present, possibly empty) that highdicom reads from the first evidence dataset.
PATIENT_STUDY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)
_PIXEL_DATA = 0x7FE00010


def add_type2(ds: pydicom.Dataset) -> pydicom.Dataset:
    """Make the missing Type 2 patient and study attributes of :data:`PATIENT_STUDY_TYPE2` present
    and empty in ``ds`` itself (for headers read for this purpose); returns ``ds``.

    highdicom reads these attributes from its source or evidence datasets and fails where one is
    absent, as it is in many exported or de-identified series.
    """
    for keyword in PATIENT_STUDY_TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, None)
    return ds


def header_with_type2(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A copy of ``ds`` without its pixel data, with :func:`add_type2` applied. ``ds`` itself is
    not changed."""
    out = pydicom.Dataset()
    for elem in ds:
        if elem.tag != _PIXEL_DATA:
            out.add(copy.deepcopy(elem))
    if hasattr(ds, "file_meta"):
        out.file_meta = copy.deepcopy(ds.file_meta)
    return add_type2(out)


def _observation_context(uid: UidMaker) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=uid("sr device"), name="ctpipe", manufacturer_name="ctpipe", model_name=__version__
    )
    return hd.sr.ObservationContext(
        observer_person_context=None,
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        ),
    )


def _nodule_groups(
    row: pd.Series,
    number: int,
    segment: hd.sr.ReferencedSegment,
    series: hd.sr.SourceSeriesForSegmentation,
    frame_of_reference_uid: str,
    uid: UidMaker,
) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    """The measurement group and the centre group of one nodule (one tracking identifier)."""
    tracking = hd.sr.TrackingIdentifier(uid=uid(f"nodule {number}"), identifier=f"nodule {number}")
    common = {
        "tracking_identifier": tracking,
        "finding_type": NODULE,
        "finding_sites": [hd.sr.FindingSite(LUNG)],
        "algorithm_id": hd.sr.AlgorithmIdentification(name="ctpipe", version=__version__),
    }
    measurements = [
        hd.sr.Measurement(name=name, value=float(row[column]), unit=unit)
        for column, (name, unit) in {**MEASUREMENTS, **OPTIONAL_MEASUREMENTS}.items()
        if column in row.index
    ]
    centre = np.array([[row["coordX"], row["coordY"], row["coordZ"]]], dtype=np.float64)
    return [
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            referenced_segment=segment, measurements=measurements, **common
        ),
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            referenced_volume_surface=hd.sr.VolumeSurface(
                graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                graphic_data=centre,
                frame_of_reference_uid=frame_of_reference_uid,
                source_series=series,
            ),
            geometric_purpose=CENTRE_PURPOSE,
            **common,
        ),
    ]


def _no_nodule_group(uid: UidMaker) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uid("no nodules"), identifier="no nodules"
        ),
        finding_type=NODULE,
        finding_sites=[hd.sr.FindingSite(LUNG)],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(codes.DCM.PresenceOfProperty, codes.SCT.Absent)
        ],
    )


def write_sr(
    path: Path,
    sources: list[pydicom.Dataset],
    seg: pydicom.Dataset,
    nodules: pd.DataFrame,
    uid: UidMaker | None = None,
) -> pydicom.Dataset:
    """Write the nodules of one series as a TID 1500 Comprehensive 3D SR (see the module docstring).

    Args:
        path: output file, written atomically.
        sources: the CT datasets of the series the SEG was made from (pixel data not needed).
            They may lack Type 2 patient and study attributes; they are not modified.
        seg: the Segmentation of ``predict`` (segment 1: the nodules) of that series.
        nodules: one row per nodule with at least :data:`REPORT_COLUMNS` (``nodules.csv``: world
            LPS mm centre, equivalent-sphere diameter in mm, volume in mm3, score in 0..1), and
            any of :data:`OPTIONAL_MEASUREMENTS`; other columns are ignored. It may be empty.
        uid: makes the SR's UIDs (:func:`uid_maker`; default: random ones).

    Returns:
        The SR dataset that was written.

    Raises:
        ValueError: no sources, a column missing, a non-finite value, or a SEG of another series.
    """
    if not sources:
        raise ValueError(f"{path}: no source datasets to report on")
    uid = uid or uid_maker()
    missing = [c for c in REPORT_COLUMNS if c not in nodules.columns]
    if missing:
        raise ValueError(f"{path}: nodule table lacks the columns {missing}")
    optional = [c for c in OPTIONAL_MEASUREMENTS if c in nodules.columns]
    values = nodules[REPORT_COLUMNS + optional].to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"{path}: nodule table has non-finite values")
    first = sources[0]
    seg_series = {str(r.SeriesInstanceUID) for r in seg.get("ReferencedSeriesSequence", [])}
    if seg_series and str(first.SeriesInstanceUID) not in seg_series:
        raise ValueError(f"{path}: the SEG does not reference series {first.SeriesInstanceUID}")

    series = hd.sr.SourceSeriesForSegmentation(str(first.SeriesInstanceUID))
    segment = hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        segment_number=1,
        source_series=series,
    )
    groups: list = []
    for number, (_, row) in enumerate(nodules.iterrows(), start=1):
        groups += _nodule_groups(row, number, segment, series, str(first.FrameOfReferenceUID), uid)
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(uid),
        procedure_reported=CT_OF_CHEST,
        imaging_measurements=groups or [_no_nodule_group(uid)],
    )
    # The first evidence dataset gives the SR its patient and study: a filled header copy.
    evidence = [header_with_type2(first), *sources[1:], seg]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=uid("sr series"),
        series_number=901,
        sop_instance_uid=uid("sr instance"),
        instance_number=1,
        manufacturer="ctpipe",
        series_description="ctpipe lung nodules",
        is_complete=True,
    )
    with atomic_path(path) as tmp:
        sr.save_as(tmp, enforce_file_format=True)
    return sr


def read_sr(path: str | Path) -> pd.DataFrame:
    """The nodules of an SR written by :func:`write_sr`, one row each, in the order written.

    Returns:
        Columns :data:`REPORT_COLUMNS` and those of :data:`OPTIONAL_MEASUREMENTS` the report has
        (``float64``); no rows for a report without nodules.

    Raises:
        ValueError: not a TID 1500 report, or a nodule without its centre or a measurement.
    """
    sr = hd.sr.srread(path)
    report = sr.content
    if not isinstance(report, hd.sr.MeasurementReport):
        raise ValueError(f"{path}: not a TID 1500 Measurement Report")
    rows: dict[str, dict[str, float]] = {}
    extra: dict[str, bool] = {}
    for group in report.get_volumetric_roi_measurement_groups(
        finding_type=NODULE, reference_type=codes.DCM.ReferencedSegment
    ):
        row = rows.setdefault(str(group.tracking_uid), {})
        for column, (name, _) in MEASUREMENTS.items():
            found = group.get_measurements(name=name)
            if len(found) != 1:
                raise ValueError(
                    f"{path}: {group.tracking_identifier} has no single {name.meaning}"
                )
            row[column] = float(found[0].value)
        for column, (name, _) in OPTIONAL_MEASUREMENTS.items():
            found = group.get_measurements(name=name)
            if found:
                extra[column] = True
                row[column] = float(found[0].value)
    for group in report.get_volumetric_roi_measurement_groups(
        finding_type=NODULE,
        reference_type=codes.DCM.VolumeSurface,
        graphic_type=hd.sr.GraphicTypeValues3D.POINT,
    ):
        x, y, z = np.asarray(group.roi.graphic_data, dtype=np.float64).reshape(3)
        rows.setdefault(str(group.tracking_uid), {}).update(coordX=x, coordY=y, coordZ=z)
    columns = REPORT_COLUMNS + list(extra)
    incomplete = [uid for uid, row in rows.items() if len(row) != len(columns)]
    if incomplete:
        raise ValueError(f"{path}: nodules without a centre or a measurement: {incomplete}")
    return pd.DataFrame(list(rows.values()), columns=columns, dtype=np.float64)
