"""De-identification library on every DICOM file that ships with pydicom, plus the table, the keys
and the leak rule. Each file is either quarantined with the expected reason, or written with no
identifying value of the input left, the PS3.15 stamps, consistent UIDs, and untouched pixels and
geometry. The identifying values are collected here independently of ``ctpipe.deid_verify``."""

from __future__ import annotations

import fnmatch
import warnings
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_files
from pydicom.datadict import keyword_for_tag
from pydicom.uid import UID_dictionary

from ctpipe.deid.engine import Deidentifier
from ctpipe.deid.files import process_file
from ctpipe.deid.keys import Keyring
from ctpipe.deid.table import DeidOptions, Profile, _resolve, table_info, table_rows
from ctpipe.deid.verify import Evidence, NeedleIndex, build_indexes, file_values, needle, scan_file

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR")
KEY = b"pytest-key-0123456789abcdef"
BURNED_OK = {"CT", "MR", "PT", "NM", "RTDOSE", "SEG"}
FILES = sorted(p for p in map(Path, get_testdata_files()) if p.is_file())
ROOT = Path(*FILES[0].parts[: FILES[0].parts.index("test_files") + 1])
REASONS = {
    "not_dicom",
    "missing_meta",
    "truncated",
    "bad_vr",
    "dicomdir",
    "secondary_capture",
    "screen_save",
    "dose_report",
    "structured_report",
    "encapsulated_document",
    "burned_in_annotation",
    "missing_uids",
    "unsupported",
    "write_failed",
}
# What must happen to each file (fnmatch on its path under pydicom's test_files; the first match
# wins). A file matched by no pattern must be written: any quarantine of it fails the test.
EXPECTED = [
    ("*DICOMDIR*", "dicomdir"),
    ("*.json", "not_dicom"),
    ("*.txt", "not_dicom"),
    ("*.dump", "not_dicom"),
    ("*.gz", "not_dicom"),
    ("*.icc", "not_dicom"),
    ("*README", "not_dicom"),
    ("no_meta.dcm", "not_dicom"),  # no preamble, and its first bytes parse as no known element
    ("*truncated*", "truncated"),
    ("reportsi*", "structured_report"),
    ("test-SR.dcm", "structured_report"),
    ("SC_*", "secondary_capture"),
    ("image_dfl.dcm", "secondary_capture"),
    # Secondary Capture Image Storage under a codec's name
    ("GDCMJ2K_TextGBR.dcm", "secondary_capture"),
    ("JPEG-lossy.dcm", "secondary_capture"),
    ("JPEG2000.dcm", "secondary_capture"),
    ("JPEG2000-embedded-sequence-delimiter.dcm", "secondary_capture"),
    ("JPEGLSNearLossless_*.dcm", "secondary_capture"),
    ("JPGExtended.dcm", "secondary_capture"),
    ("meta_missing_tsyntax.dcm", "missing_meta"),
    ("*NoMeta.dcm", "missing_meta"),
    ("rtstruct.dcm", "missing_meta"),
    # pixels without BurnedInAnnotation, of a modality not in BURNED_OK (US, CR, none)
    ("examples_*color.dcm", "burned_in_annotation"),
    ("examples_jpeg2k.dcm", "burned_in_annotation"),
    ("examples_palette.dcm", "burned_in_annotation"),
    ("ExplVR_BigEnd.dcm", "burned_in_annotation"),
    ("nested_priv_SQ.dcm", "burned_in_annotation"),
    ("dicomdirtests/77654033/CR*/*", "burned_in_annotation"),
    # no StudyInstanceUID: nowhere to file the output
    ("UN_sequence.dcm", "missing_uids"),
    ("empty_charset_LEI.dcm", "missing_uids"),
    ("no_meta_group_length.dcm", "missing_uids"),
    ("priv_SQ.dcm", "missing_uids"),
    ("CT_small.dcm", ""),
    ("MR_small*.dcm", ""),
    ("rtplan.dcm", ""),
    ("rtdose*.dcm", ""),
    ("liver*.dcm", ""),
    ("waveform_ecg.dcm", ""),
]
GEOMETRY = [
    "Rows",
    "Columns",
    "PixelSpacing",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "SliceThickness",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "PhotometricInterpretation",
    "NumberOfFrames",
    "SamplesPerPixel",
]
ID_KEYWORDS = {
    "PatientID",
    "OtherPatientIDs",
    "AccessionNumber",
    "InstitutionName",
    "InstitutionAddress",
    "StationName",
    "DeviceSerialNumber",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "StudyID",
    "RequestedProcedureID",
    "MedicalRecordLocator",
    "PerformedProcedureStepID",
    "ScheduledProcedureStepID",
    "IssuerOfPatientID",
}
GENERIC = {"anon", "anonymous", "anonymized", "unknown", "none", "test", "patient", "phantom"}


def read(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcmread(path)


def expected_reason(path: Path) -> str:
    """The quarantine reason ``path`` must get, or "" where it must be written."""
    rel = path.relative_to(ROOT).as_posix()
    return next((reason for pattern, reason in EXPECTED if fnmatch.fnmatchcase(rel, pattern)), "")


def output_values(ds) -> list[str]:
    """Every string value of a dataset (meta included), lower case, multi-values split."""
    out = []
    for elem in [*ds.file_meta.iterall(), *ds.iterall()]:
        if elem.VR in ("SQ", "OB", "OW", "UN") or elem.tag == 0x7FE00010 or elem.value is None:
            continue
        values = elem.value if elem.VM > 1 else [elem.value]
        out += [str(v).strip().lower() for v in values]
    return out


def identifying(ds) -> tuple[set[str], set[str]]:
    """(names and text IDs to search as substrings, UIDs and dates to search as whole values).

    As the stage's rule says, a value that the input also holds in an attribute the profile keeps
    (e.g. a station name equal to the manufacturer) is not identifying.
    """
    text, exact, other = set(), set(), []
    for elem in ds.iterall():
        if elem.value in (None, "", b"") or elem.VR == "SQ":
            continue
        values = [str(v).strip() for v in (elem.value if elem.VM > 1 else [elem.value])]
        keyword = keyword_for_tag(elem.tag) if not elem.tag.is_private else ""
        if elem.VR == "PN":
            for v in values:
                text.add(v.lower())
                text.update(p.lower() for p in v.replace("=", "^").split("^"))
        elif keyword in ID_KEYWORDS or (elem.tag.is_private and elem.VR in ("LO", "SH", "PN")):
            text.update(v.lower() for v in values)
        elif elem.VR == "UI" and not keyword.endswith(("ClassUID", "SyntaxUID")):
            exact.update(v for v in values if v and v not in UID_dictionary)
        elif elem.VR == "DA":
            exact.update(v for v in values if len(v) == 8)
        elif not elem.tag.is_private and elem.VR in ("LO", "SH", "CS", "ST", "LT"):
            other += [v.lower() for v in values]
    kept = "\x00".join(other)
    text = {
        t
        for t in text
        if len(t) >= 4 and t not in GENERIC and any(c.isalpha() for c in t) and t not in kept
    }
    return text, exact


@pytest.fixture(scope="module")
def deid() -> Deidentifier:
    return Deidentifier(DeidOptions(), Keyring(KEY))


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_pydicom_file(path: Path, deid: Deidentifier, tmp_path: Path):
    deid.reset_caches()  # each file on its own: its evidence must be complete
    result = process_file(path, path.name, deid, tmp_path, BURNED_OK, keep_linkage=False)
    assert result.reason == expected_reason(path), result.detail
    if result.reason:
        assert result.reason in REASONS and result.detail
        assert not (tmp_path / "dicom").exists()
        return
    original, new = read(path), read(tmp_path / result.out_rel)
    keyring = Keyring(KEY)
    # stamps and file meta
    assert new.preamble == b"\x00" * 128
    assert new.PatientIdentityRemoved == "YES"
    assert [i.CodeValue for i in new.DeidentificationMethodCodeSequence] == DeidOptions().codes()
    assert new.LongitudinalTemporalInformationModified == "MODIFIED"
    assert new.file_meta.MediaStorageSOPInstanceUID == new.SOPInstanceUID
    assert new.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert new.SOPClassUID == original.SOPClassUID
    for keyword in (
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "FrameOfReferenceUID",
    ):
        if original.get(keyword):
            assert new[keyword].value == keyring.uid(original[keyword].value)
            assert new[keyword].value.startswith("2.25.") and len(new[keyword].value) <= 64
    assert (
        result.out_rel
        == f"dicom/{new.StudyInstanceUID}/{new.SeriesInstanceUID}/{new.SOPInstanceUID}.dcm"
    )
    # images stay usable
    for keyword in GEOMETRY:
        assert new.get(keyword) == original.get(keyword), keyword
    if "PixelData" in original:
        assert new.PixelData == original.PixelData
    # nothing identifying survives, private tags are gone, references are remapped
    assert not any(e.tag.is_private for e in new.iterall())
    values = output_values(new)
    haystack = "\x00".join(values)
    text, exact = identifying(original)
    assert not [t for t in text if t in haystack]
    assert not exact & set(values)
    # the stage's own verification parses the file and finds none of its evidence in it
    per_patient, cross = build_indexes({"p": result.evidence}, 4)
    assert scan_file(tmp_path / result.out_rel, [per_patient["p"], cross]) == []
    assert set(file_values((tmp_path / result.out_rel).read_bytes()))
    refs_in = {e.value for e in original.iterall() if e.keyword == "ReferencedSOPInstanceUID"}
    refs_out = {e.value for e in new.iterall() if e.keyword == "ReferencedSOPInstanceUID"}
    assert refs_out <= {keyring.uid(r) for r in refs_in}


def test_every_pydicom_category_is_exercised(deid: Deidentifier, tmp_path: Path):
    """The bundled files cover writing and the main quarantine reasons (so the test above bites)."""
    reasons = {
        process_file(p, p.name, deid, tmp_path / p.name, BURNED_OK, False).reason for p in FILES
    }
    assert {
        "",
        "not_dicom",
        "missing_meta",
        "truncated",
        "dicomdir",
        "secondary_capture",
        "structured_report",
        "burned_in_annotation",
    } <= reasons


# -- the table ---------------------------------------------------------------------------------


def test_table_is_the_whole_basic_profile():
    rows = table_rows()
    assert len(rows) >= 600 and table_info()["rows"] == len(rows)
    codes = {r["basic"] for r in rows}
    assert {"D", "Z", "X", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"} <= codes
    tags = {r["tag"] for r in rows}
    assert {"00100010", "00100020", "00080020", "0020000D", "50XXXXXX", "60XX3000"} <= tags


def test_edited_table_is_refused(monkeypatch):
    import ctpipe.deid.table as table

    original = table._read_text
    monkeypatch.setattr(
        table,
        "_read_text",
        lambda name: (
            original(name).replace(",X,", ",K,", 1) if name == table.TABLE_CSV else original(name)
        ),
    )
    table.table_info.cache_clear()
    table.table_rows.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="SHA-256"):
            table.table_rows()
    finally:
        table.table_info.cache_clear()
        table.table_rows.cache_clear()


def test_combined_codes_follow_the_attribute_type():
    assert _resolve("X/Z", None) == "X" and _resolve("X/Z", 1) == "Z" and _resolve("X/Z", 0) == "Z"
    assert _resolve("X/D", 1) == "D" and _resolve("X/Z/D", 1) == "Z" and _resolve("X/Z/D", 0) == "D"
    assert _resolve("Z/D", None) == "Z" and _resolve("Z/D", 0) == "D"
    assert _resolve("X/Z/U*", None) == "U"  # reference sequences kept, their UIDs replaced
    ct = Profile(DeidOptions()).actions("1.2.840.10008.5.1.4.1.1.2", nested=False)
    assert ct[0x00080023] == "C"  # Content Date: Z/D, Type 2C in CT; the dates option cleans it
    basic = Profile(DeidOptions(retain_modified_dates=False)).actions(
        "1.2.840.10008.5.1.4.1.1.2", False
    )
    assert basic[0x00080023] == "Z" and basic[0x00080022] == "X"  # Type 2C -> Z; Type 3 -> X


def test_options_change_the_actions():
    ct = "1.2.840.10008.5.1.4.1.1.2"
    basic = Profile(DeidOptions(False, False, False, False, False)).actions(ct, False)
    full = Profile(DeidOptions(True, True, True, True, True)).actions(ct, False)
    assert basic[0x00101010] == "X" and full[0x00101010] == "K"  # Patient's Age
    assert basic[0x00081030] == "X" and full[0x00081030] == "C"  # Study Description
    assert basic[0x00181000] == "X" and full[0x00181000] == "K"  # Device Serial Number
    assert basic[0x00080020] == "Z" and full[0x00080020] == "C"  # Study Date


# -- keys ----------------------------------------------------------------------------------------


def test_uids_are_keyed_consistent_and_short():
    one, other = Keyring(KEY), Keyring(b"another-key-0123456789")
    uid = "1.2.840.113619.2.55.3.604688119.971.1091088080.1"
    assert one.uid(uid) == Keyring(KEY).uid(uid) == one.uid(uid + "\x00")
    assert one.uid(uid) != other.uid(uid) and one.uid(uid) != one.uid(uid + "1")
    assert one.uid(uid).startswith("2.25.") and len(one.uid(uid)) <= 64
    assert one.patient_id("id:MRN1") == one.patient_id("id:MRN1") != other.patient_id("id:MRN1")


def test_date_offsets_are_per_patient_and_never_zero():
    keyring = Keyring(KEY)
    days = [keyring.date_offset(f"id:{i}", -3, 3).days for i in range(300)]
    assert 0 not in days and set(days) == {-3, -2, -1, 1, 2, 3}
    assert keyring.date_offset("id:a", -3650, -365) == keyring.date_offset("id:a", -3650, -365)


# -- the leak rule -------------------------------------------------------------------------------


def test_needles_ignore_short_and_generic_values():
    assert needle("m", 4) is None and needle("CT".lower(), 4) is None and needle("yes", 4) is None
    assert needle("anonymous", 4) is None
    assert needle("doe^jane", 4) == ("doe", "jane") and needle("20190312", 4) == "20190312"


def test_needle_matching_rules():
    index = NeedleIndex([("doe", "jane"), ("jane",), "20190312", "1234567", "1.2.3.4"])
    assert index.hits(["seen by doe, jane"]) == {("doe", "jane"), ("jane",)}
    assert index.hits(["janet"]) == set() and index.hits(["doe", "jane"]) == {("jane",)}
    assert index.hits(["20190312101010.5"]) == {"20190312"}  # the date part of a DT
    assert index.hits(["mrn 1234567 x"]) == {"1234567"} and index.hits(["1.2.3.4.5"]) == set()


def test_kept_and_produced_values_are_not_leaks():
    ev = Evidence(
        ident={"1234", "smith^john", "20200101"},
        weak={"lung"},
        kept={"1234", "chest"},
        cleaned={"lung 1.0 b60f"},
        produced={"20200101"},
    )
    per_patient, cross = build_indexes({"p": ev}, 4)
    index = per_patient["p"]
    assert index.exact == set()  # 1234 is a kept value, 20200101 a shifted date we wrote
    assert ("smith", "john") in index.text["smith"] and not index.text.get("lung")
    assert ("smith", "john") in cross.text["smith"]
