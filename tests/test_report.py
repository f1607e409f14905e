"""The nodule SR of ctpipe.deploy.report: TID 1500 written with highdicom, read back with it."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import highdicom as hd
import numpy as np
import pandas as pd
import pydicom
import pytest
from highdicom.sr.utils import find_content_items
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage

from ctpipe import synth
from ctpipe.deploy.predict import write_seg
from ctpipe.deploy.report import (
    PATIENT_STUDY_TYPE2,
    REPORT_COLUMNS,
    header_with_type2,
    read_sr,
    write_sr,
)

# highdicom stores a float NUM value twice, as a decimal string (16 characters) and as a double
# (FloatingPointValue, which it reads first); the centre is SCOORD3D graphic data, float32.
MEASURE_RTOL = 1e-12
CENTRE_ATOL_MM = 1e-4
STRIPPED = (
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def two_blob_mask(shape: tuple[int, int, int]) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[2:5, 10:15, 10:15] = 1
    mask[6:9, 30:34, 28:33] = 1
    return mask


def known_nodules() -> pd.DataFrame:
    """Two rows shaped like ``nodules.csv``, with digits that a short encoding would lose."""
    return pd.DataFrame(
        {
            "coordX": [-61.123456, 48.765432],
            "coordY": [-12.345678, 23.456789],
            "coordZ": [-95.5, -70.25],
            "diameter_mm": [14.123456789012, 9.87654321],
            "score": [0.987654321, 0.123456789],
            "peak": [0.99, 0.5],
            "elongation": [1.1, 2.3],
            "volume_mm3": [1475.0123456, 504.4444],
            "seriesuid": ["x", "x"],
        }
    )


def strip_type2(sources: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    out = copy.deepcopy(sources)
    for ds in out:
        for keyword in STRIPPED:
            if keyword in ds:
                delattr(ds, keyword)
    return out


@pytest.fixture(scope="module")
def series(tmp_path_factory, tiny_synth) -> SimpleNamespace:
    """A 12-slice synthetic CT series (sorted by z) and a SEG of two blobs over it."""
    root = tmp_path_factory.mktemp("report")
    synth.write_case(root / "study", 7, 0, tiny_synth.but(z_extent_mm=60))
    sources = [pydicom.dcmread(p) for p in sorted((root / "study").rglob("*.dcm"))]
    sources.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    shape = (len(sources), int(sources[0].Rows), int(sources[0].Columns))
    write_seg(root / "seg.dcm", sources, two_blob_mask(shape))
    return SimpleNamespace(root=root, sources=sources, seg=pydicom.dcmread(root / "seg.dcm"))


def assert_same_nodules(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    assert list(got.columns) == REPORT_COLUMNS
    assert len(got) == len(expected)
    for column in REPORT_COLUMNS:
        tol = {"atol": CENTRE_ATOL_MM} if column.startswith("coord") else {"rtol": MEASURE_RTOL}
        np.testing.assert_allclose(got[column], expected[column], **tol, err_msg=column)


def num_items(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    """Every NUM content item of a dataset (only to corrupt a file in a test)."""
    found = []
    for item in ds.get("ContentSequence", []):
        if item.ValueType == "NUM":
            found.append(item)
        found += num_items(item)
    return found


def test_round_trip(series, tmp_path: Path):
    nodules = known_nodules()
    written = write_sr(tmp_path / "sr.dcm", series.sources, series.seg, nodules)
    ds = pydicom.dcmread(tmp_path / "sr.dcm")
    assert ds.SOPClassUID == Comprehensive3DSRStorage
    assert ds.SOPInstanceUID == written.SOPInstanceUID
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert ds.StudyInstanceUID == series.sources[0].StudyInstanceUID
    assert ds.PatientID == series.sources[0].PatientID
    report = hd.sr.srread(tmp_path / "sr.dcm").content
    assert isinstance(report, hd.sr.MeasurementReport)
    assert_same_nodules(read_sr(tmp_path / "sr.dcm"), nodules)


def test_groups_codes_and_observer(series, tmp_path: Path):
    write_sr(tmp_path / "sr.dcm", series.sources, series.seg, known_nodules())
    report = hd.sr.srread(tmp_path / "sr.dcm").content
    groups = report.get_volumetric_roi_measurement_groups(
        reference_type=codes.DCM.ReferencedSegment
    )
    assert [g.tracking_identifier for g in groups] == ["nodule 1", "nodule 2"]
    assert len({g.tracking_uid for g in groups}) == 2
    for group in groups:
        assert group.finding_type == codes.SCT.Nodule
        assert [s.value for s in group.finding_sites] == [codes.SCT.Lung]
        units = {m.name.value: m.unit.value for m in group.get_measurements()}
        assert units == {"81827009": "mm", "118565006": "mm3", "111012": "1"}
        centres = report.get_volumetric_roi_measurement_groups(
            tracking_uid=group.tracking_uid, reference_type=codes.DCM.VolumeSurface
        )
        assert len(centres) == 1
        assert centres[0].roi.frame_of_reference_uid == series.sources[0].FrameOfReferenceUID
    (procedure,) = find_content_items(report[0], name=codes.DCM.ProcedureReported)
    assert procedure.ConceptCodeSequence[0].CodeValue == "169069000"  # SCT "CT of chest"
    (observer,) = report.get_observer_contexts(observer_type=codes.DCM.Device)
    attributes = observer.observer_identifying_attributes
    assert (attributes.name, attributes.manufacturer_name) == ("ctpipe", "ctpipe")


def test_references_seg_and_source_series(series, tmp_path: Path):
    write_sr(tmp_path / "sr.dcm", series.sources, series.seg, known_nodules())
    sr = hd.sr.srread(tmp_path / "sr.dcm")
    seg_uid, series_uid = series.seg.SOPInstanceUID, series.sources[0].SeriesInstanceUID
    groups = sr.content.get_volumetric_roi_measurement_groups(referenced_sop_instance_uid=seg_uid)
    assert len(groups) == 2
    for group in groups:
        segment = group.referenced_segment
        assert segment.referenced_sop_instance_uid == seg_uid
        assert segment.referenced_sop_class_uid == series.seg.SOPClassUID
        assert segment.referenced_segment_numbers == [1]
        assert not segment.has_source_images()
        assert segment.source_series_for_segmentation.value == series_uid
    evidence = {uids[2] for uids in sr.get_evidence()}
    assert seg_uid in evidence
    assert {ds.SOPInstanceUID for ds in series.sources} <= evidence
    assert (series.sources[0].StudyInstanceUID, series_uid) in sr.get_evidence_series()


def test_corrupted_values_change_read_sr(series, tmp_path: Path):
    nodules = known_nodules()
    write_sr(tmp_path / "sr.dcm", series.sources, series.seg, nodules)
    ds = pydicom.dcmread(tmp_path / "sr.dcm")
    value = num_items(ds)[0].MeasuredValueSequence[0]
    value.NumericValue, value.FloatingPointValue = "99.5", 99.5
    ds.save_as(tmp_path / "bad.dcm")
    got = read_sr(tmp_path / "bad.dcm")
    assert got.loc[0, "diameter_mm"] == 99.5
    with pytest.raises(AssertionError):
        assert_same_nodules(got, nodules)
    # A nodule with another centre is another nodule: the shifted row must not match either.
    shifted = nodules.assign(coordZ=nodules["coordZ"] + 0.01)
    with pytest.raises(AssertionError):
        assert_same_nodules(read_sr(tmp_path / "sr.dcm"), shifted)


def test_zero_nodules(series, tmp_path: Path):
    empty = known_nodules().iloc[:0]
    write_sr(tmp_path / "sr.dcm", series.sources, series.seg, empty)
    sr = hd.sr.srread(tmp_path / "sr.dcm")
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    (group,) = sr.content.get_image_measurement_groups()
    (evaluation,) = group.get_qualitative_evaluations(name=codes.DCM.PresenceOfProperty)
    assert evaluation.value == codes.SCT.Absent
    assert series.seg.SOPInstanceUID in {uids[2] for uids in sr.get_evidence()}
    got = read_sr(tmp_path / "sr.dcm")
    assert list(got.columns) == REPORT_COLUMNS
    assert got.empty


def test_missing_type2_attributes(series, tmp_path: Path):
    stripped = strip_type2(series.sources)
    assert not any(k in ds for ds in stripped for k in STRIPPED)
    # write_seg (highdicom) needs them present: it gets filled header copies.
    write_seg(
        tmp_path / "seg.dcm",
        [header_with_type2(ds) for ds in stripped],
        two_blob_mask((len(stripped), int(stripped[0].Rows), int(stripped[0].Columns))),
    )
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    nodules = known_nodules()
    write_sr(tmp_path / "sr.dcm", stripped, seg, nodules)
    # The caller's datasets are unchanged: still without the attributes, pixels intact.
    assert not any(k in ds for ds in stripped for k in STRIPPED)
    assert all("PixelData" in ds for ds in stripped)
    ds = pydicom.dcmread(tmp_path / "sr.dcm")
    for keyword in PATIENT_STUDY_TYPE2:
        assert keyword in ds, keyword
    assert ds.AccessionNumber == "" and ds.PatientSex == ""
    assert ds.PatientID == series.sources[0].PatientID
    assert_same_nodules(read_sr(tmp_path / "sr.dcm"), nodules)


def test_header_with_type2_keeps_present_values(series):
    ds = series.sources[0]
    out = header_with_type2(strip_type2([ds])[0])
    assert "PixelData" not in out
    assert "PatientBirthDate" in out and not out.PatientBirthDate
    assert out.PatientID == ds.PatientID and out.SOPInstanceUID == ds.SOPInstanceUID


def test_rejects_incomplete_tables(series, tmp_path: Path):
    with pytest.raises(ValueError, match="volume_mm3"):
        write_sr(
            tmp_path / "sr.dcm",
            series.sources,
            series.seg,
            known_nodules().drop(columns="volume_mm3"),
        )
    with pytest.raises(ValueError, match="non-finite"):
        write_sr(
            tmp_path / "sr.dcm", series.sources, series.seg, known_nodules().assign(score=np.nan)
        )
    other = copy.deepcopy(series.seg)
    other.ReferencedSeriesSequence[0].SeriesInstanceUID = hd.UID()
    with pytest.raises(ValueError, match="does not reference series"):
        write_sr(tmp_path / "sr.dcm", series.sources, other, known_nodules())
    assert not (tmp_path / "sr.dcm").exists()
