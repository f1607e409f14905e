"""Free text without known names: the patterns scrubbed from kept descriptors and looked for by
the leak gate, the cohort's name components, and the allow-list (``ctpipe.deid.freetext``)."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ctpipe.deid import batch, freetext
from ctpipe.deid.table import DeidOptions, Profile
from ctpipe.deid.verify import FreeTextCheck, name_index, scan_file

LEAKY = [
    ("seen by Dr Fenwick Oddsworth on ward 7", "titled name", "seen by on ward 7"),
    ("DR. FENWICK ODDSWORTH", "titled name", ""),
    ("CT thorax for QUINCE^MARGARETTA", "person name (PN format)", "CT thorax for"),
    ("call +44 20 7946 0958 today", "phone number", "call today"),
    ("report to f.odd@example.org", "e-mail address", "report to"),
    ("scanned 12 March 2021", "date", "scanned"),
    ("scanned 2021-03-12", "date", "scanned"),
    ("MRN 12345678 chest", "identifier", "MRN chest"),
    ("prior 1.2.840.113619.2.55.3 axial", "UID", "prior axial"),
]
HARMLESS = ["Lung 1.0 B60f", "CHEST 120 kV 0.6 mm", "1.25 mm 5/10", "Pitch 1.375", "Dr"]


@pytest.mark.parametrize(("text", "kind", "scrubbed"), LEAKY)
def test_patterns_find_and_scrub_what_no_header_holds(text, kind, scrubbed):
    assert kind in {k for k, _ in freetext.pattern_matches(text)}
    assert freetext.scrub(text) == scrubbed


@pytest.mark.parametrize("text", HARMLESS)
def test_descriptor_vocabulary_is_left_alone(text):
    assert freetext.pattern_matches(text) == [] and freetext.scrub(text) == text


def test_scrub_finds_every_match_in_the_original_text():
    """A file term that eats the title must not hide the titled name from the pattern."""
    term = __import__("re").compile(r"(?i)\bdr\b")
    assert freetext.scrub("seen by DR. FENWICK ODDSWORTH", [term]) == "seen by"


def test_name_components_skip_particles_and_initials():
    assert freetext.name_components(["van der Berg^Anna^J", "DOE^JANE=ドウ^ジェーン"]) == {
        "berg",
        "anna",
        "doe",
        "jane",
        "ドウ",
        "ジェーン",
    }


def write(path, **values) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.SOPClassUID = CTImageStorage
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)


def test_gate_looks_for_patterns_and_cohort_names_in_free_text_only(tmp_path):
    path = tmp_path / "out.dcm"
    write(
        path,
        SeriesDescription="Lung Dr Fenwick Oddsworth",
        StudyDescription="CT chest Margaretta",
        Manufacturer="Dr Fenwick Medical",  # a kept attribute, not free text: not a finding
        ImageComments="call 020 7946 0958",
    )
    check = FreeTextCheck(
        frozenset(Profile(DeidOptions()).descriptive), name_index({"margaretta", "li"}, 4)
    )
    findings = scan_file(path, [], check)
    assert "titled name 'Dr Fenwick Oddsworth' in (0008,103E)" in findings
    assert "cohort name ('margaretta',) in (0008,1030)" in findings
    assert any(f.startswith("phone number") and "(0020,4000)" in f for f in findings)
    assert not [f for f in findings if "(0008,0070)" in f]
    assert scan_file(path, []) == []  # the known-value scan alone finds none of it


def test_cohort_names_come_from_every_header_at_every_depth(tmp_path):
    item = Dataset()
    item.ScheduledPerformingPhysicianName = "ODDSWORTH^FENWICK"
    write(
        tmp_path / "a.dcm",
        PatientName="QUINCE^MARGARETTA",
        RequestAttributesSequence=[item],
        StudyDescription="for WREN^ISOLDE",  # a PN-formatted token in text is a name too
    )
    (tmp_path / "b.dcm").write_bytes(b"not dicom")
    items = [(str(p), p.name) for p in sorted(tmp_path.iterdir())]
    names = batch.cohort_names(items, workers=1, chunksize=1)
    assert names == {"quince", "margaretta", "oddsworth", "fenwick", "wren", "isolde"}


def test_an_unknown_allow_listed_keyword_is_refused():
    with pytest.raises(ValueError, match="SeriesDescripton"):
        Profile(DeidOptions(keep_descriptors=("SeriesDescripton",)))
    with pytest.raises(ValueError, match="PatientName"):  # not free text: never "kept scrubbed"
        Profile(DeidOptions(keep_descriptors=("PatientName",)))
