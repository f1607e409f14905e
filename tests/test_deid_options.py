"""Each PS3.15 option of the anonymize stage, on synthetic CT slices that carry realistic PHI, plus
nested sequences, private blocks and the transfer syntaxes pydicom can write."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from ctpipe import synth
from ctpipe.deid.engine import Deidentifier
from ctpipe.deid.files import process_file
from ctpipe.deid.freetext import DEFAULT_KEEP_DESCRIPTORS
from ctpipe.deid.keys import DEMO_KEY, Keyring
from ctpipe.deid.table import DeidOptions

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR")
CFG = synth.Cohort(
    matrix=32,
    slice_spacing_mm=(2.5,),
    z_extent_mm=10,
    vessels_per_lung=1,
    fraction_without_nodules=0.0,
    max_nodules=1,
    diameter_mm=(5, 20),
)
NONE = DeidOptions(False, False, False, False, False)


@pytest.fixture(scope="module")
def slices(tmp_path_factory) -> list[Path]:
    """Two patients, four slices each; the first slice of patient 0 gets extra PHI places."""
    root = tmp_path_factory.mktemp("synthetic")
    files = []
    for index in range(2):
        _, written = synth.write_study(synth.make_case(3, index, CFG), root, 3)
        files += written
    ds = dcmread(files[0])
    study = dt.datetime.strptime(ds.StudyDate, "%Y%m%d")
    ds.AcquisitionDate = (study + dt.timedelta(days=1)).strftime("%Y%m%d")  # an interval to keep
    block = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
    block.add_new(0x23, "DS", "1.375")  # Table Speed: on the Safe Private allow-list
    block.add_new(0x99, "LO", ds.PatientName.family_name)  # not on it
    deep = Dataset()
    deep.PatientName, deep.ReferencedSOPInstanceUID = ds.PatientName, ds.StudyInstanceUID
    ds.RequestAttributesSequence[0].ReferencedStudySequence[0].ContentSequence = Sequence([deep])
    ds.SourceImageSequence = Sequence([Dataset()])
    ds.SourceImageSequence[0].ReferencedSOPClassUID = ds.SOPClassUID
    ds.SourceImageSequence[0].ReferencedSOPInstanceUID = dcmread(files[1]).SOPInstanceUID
    ds.save_as(files[0], enforce_file_format=True)
    return files


def run(path: Path, tmp_path: Path, options: DeidOptions, key: bytes = DEMO_KEY):
    deid = Deidentifier(options, Keyring(key))
    result = process_file(path, path.name, deid, tmp_path, {"CT"}, keep_linkage=False)
    assert not result.reason, result.detail
    return dcmread(path), dcmread(tmp_path / result.out_rel), result


def test_modified_dates_shift_each_patient_by_one_keyed_offset(slices, tmp_path):
    keyring, offsets = Keyring(DEMO_KEY), []
    for path in (slices[0], slices[1], slices[4]):
        original, new, _ = run(path, tmp_path, DeidOptions())
        offset = keyring.date_offset("id:" + original.PatientID, -3650, -365)
        assert (
            dt.datetime.strptime(new.StudyDate, "%Y%m%d")
            - dt.datetime.strptime(original.StudyDate, "%Y%m%d")
            == offset
        )
        assert new.StudyTime == original.StudyTime and new.ContentDate == new.StudyDate
        assert new.LongitudinalTemporalInformationModified == "MODIFIED"
        assert new.PatientBirthDate == ""  # Z in the profile, not shifted by the option
        offsets.append(offset)
        if path == slices[0]:  # the interval between study and acquisition is preserved
            day = dt.datetime.strptime
            assert day(new.AcquisitionDate, "%Y%m%d") - day(
                new.StudyDate, "%Y%m%d"
            ) == dt.timedelta(1)
    assert offsets[0] == offsets[1] != offsets[2]


def test_without_the_dates_option_dates_are_gone(slices, tmp_path):
    original, new, _ = run(slices[0], tmp_path, NONE)
    assert new.StudyDate == "" and "AcquisitionDate" not in new and "SeriesDate" not in new
    assert new.LongitudinalTemporalInformationModified == "REMOVED"
    assert "113107" not in [i.CodeValue for i in new.DeidentificationMethodCodeSequence]
    assert original.StudyTime not in (new.get("StudyTime"), new.get("AcquisitionTime"))


def test_patient_characteristics(slices, tmp_path):
    original, kept, _ = run(
        slices[0], tmp_path / "on", DeidOptions(retain_patient_characteristics=True)
    )
    for keyword in ("PatientSex", "PatientAge", "PatientSize", "PatientWeight"):
        assert kept[keyword].value == original[keyword].value
    _, removed, _ = run(slices[0], tmp_path / "off", NONE)
    assert removed.PatientSex == "" and not {"PatientAge", "PatientSize", "PatientWeight"} & set(
        removed.dir()
    )


def test_device_identity(slices, tmp_path):
    original, kept, _ = run(slices[0], tmp_path / "on", DeidOptions(retain_device_identity=True))
    assert kept.DeviceSerialNumber == original.DeviceSerialNumber
    assert kept.StationName == original.StationName
    assert "113109" in [i.CodeValue for i in kept.DeidentificationMethodCodeSequence]
    _, removed, _ = run(slices[0], tmp_path / "off", DeidOptions())
    assert "DeviceSerialNumber" not in removed and "StationName" not in removed


def test_clean_descriptors_keep_allow_listed_text_but_no_identity(slices, tmp_path):
    original, new, _ = run(slices[0], tmp_path / "on", DeidOptions(clean_descriptors=True))
    name = original.PatientName
    assert new.StudyDescription.startswith("CT CHEST LOW DOSE") and new.SeriesDescription
    low = new.StudyDescription.lower()
    assert name.family_name.lower() not in low and name.given_name.lower() not in low
    # comments, histories and the request sequence are not on the allow-list: removed
    removed = {"ImageComments", "AdditionalPatientHistory", "RequestAttributesSequence"}
    assert removed <= set(original.dir()) and not removed & set(new.dir())
    _, plain, _ = run(slices[0], tmp_path / "off", NONE)
    assert not {"StudyDescription", "SeriesDescription", "ImageComments"} & set(plain.dir())
    _, none_kept, _ = run(slices[0], tmp_path / "empty", DeidOptions(keep_descriptors=()))
    assert not {"StudyDescription", "SeriesDescription"} & set(none_kept.dir())


def test_safe_private_allow_list(slices, tmp_path):
    _, kept, _ = run(slices[0], tmp_path / "on", DeidOptions(retain_safe_private=True))
    block = kept.private_block(0x0019, "GEMS_ACQU_01")
    assert block[0x23].value == "1.375"
    assert [
        e.tag.element & 0xFF for e in kept if e.tag.group == 0x0019 and e.tag.element > 0xFF
    ] == [0x23]
    assert not [e for e in kept if e.tag.group == 0x0029]  # the vendor block that repeats the name
    _, removed, _ = run(slices[0], tmp_path / "off", DeidOptions())
    assert not any(e.tag.is_private for e in removed.iterall())


def test_nested_sequences_and_references(slices, tmp_path):
    keep = (*DEFAULT_KEEP_DESCRIPTORS, "RequestAttributesSequence")
    original, new, _ = run(slices[0], tmp_path, DeidOptions(keep_descriptors=keep))
    keyring = Keyring(DEMO_KEY)
    assert "OtherPatientIDsSequence" not in new
    request = new.RequestAttributesSequence[0]  # allow-listed (C): its items are walked
    assert (
        "ScheduledPerformingPhysicianName" not in request and "RequestedProcedureID" not in request
    )
    assert "ReferencedStudySequence" not in request  # X/Z, Type 3 here: removed with its content
    source = new.SourceImageSequence[0]  # X/Z/U*: kept, UID replaced as in the other file
    assert source.ReferencedSOPInstanceUID == keyring.uid(dcmread(slices[1]).SOPInstanceUID)
    assert source.ReferencedSOPClassUID == original.SOPClassUID


def test_same_key_same_output_other_key_differs(slices, tmp_path):
    _, one, r1 = run(slices[2], tmp_path / "a", DeidOptions())
    _, two, r2 = run(slices[2], tmp_path / "b", DeidOptions())
    _, other, _ = run(slices[2], tmp_path / "c", DeidOptions(), key=b"a-different-secret-key")
    assert (tmp_path / "a" / r1.out_rel).read_bytes() == (tmp_path / "b" / r2.out_rel).read_bytes()
    assert one.PatientID == two.PatientID != other.PatientID
    assert one.SOPInstanceUID != other.SOPInstanceUID and one.StudyDate != other.StudyDate
    assert one.PixelData == other.PixelData


@pytest.mark.parametrize(
    "syntax", [ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian]
)
def test_transfer_syntaxes(slices, tmp_path, syntax):
    original = dcmread(slices[3])
    ds = Dataset()  # decoded copy: pydicom encodes it afresh in the new transfer syntax
    for elem in original:
        ds.add(elem)
    ds.file_meta = original.file_meta
    ds.file_meta.TransferSyntaxUID = syntax
    source = tmp_path / "in.dcm"
    dcmwrite(source, ds, enforce_file_format=True)
    original, new, _ = run(source, tmp_path / "out", DeidOptions())
    assert new.file_meta.TransferSyntaxUID == syntax
    assert new.pixel_array.tolist() == original.pixel_array.tolist()
    assert new.ImagePositionPatient == original.ImagePositionPatient
    assert new.PatientName != original.PatientName and new.PatientIdentityRemoved == "YES"
