"""One input file through the anonymize stage: read, gate, de-identify, write.

Gates (a file that fails one is quarantined with a reason, never passed through):

- ``not_dicom`` / ``missing_meta``: unreadable, or no file meta / transfer syntax (no ``DICM``);
- ``truncated``: an element (pixel data included) ends beyond the end of the file, or an image
  has no pixel data;
- ``bad_vr``: an element with a Value Representation that DICOM does not define;
- ``dicomdir``: a DICOMDIR (patient directory records), never copied;
- ``secondary_capture``, ``screen_save``, ``dose_report``, ``structured_report``,
  ``encapsulated_document``: objects whose pixels or content can carry burned-in or free-text PHI
  that header de-identification cannot clean;
- ``burned_in_annotation``: pixel data whose BurnedInAnnotation is not NO (a missing value is
  accepted only for the modalities in ``burned_in_missing_ok``, e.g. CT, whose reconstructed
  slices carry no annotations), or with RecognizableVisualFeatures YES;
- ``missing_uids``: no Study, Series or SOP Instance UID to name the output after;
- ``bad_uid``: one of those is not a DICOM UID (PS3.5 9.1: ``..``, a path, 65 digits, ...);
- ``unreadable``: the file cannot be read (permission denied, gone since it was listed);
- ``unsafe_path``: the output (or a MetaImage's data file) would lie outside its folder;
- ``unsupported`` / ``write_failed``: any other error while de-identifying or writing.
The public reason is one of these words; the exception text (which may quote PHI) goes only to
the private quarantine list.

Reading takes a short path for well-formed files (``DICM``, group length, transfer syntax: the
dataset parsed by pydicom's ``read_dataset``) and falls back to ``dcmread`` for anything else, so
odd files are judged by pydicom's full reader.
"""

from __future__ import annotations

import shutil
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)

from ctpipe.deid.engine import BadVR, Deidentifier
from ctpipe.deid.names import name_parts, names_of_file
from ctpipe.deid.verify import Evidence
from ctpipe.deid.write import text_of, write_file
from ctpipe.fileio import atomic_path
from ctpipe.safepath import UnsafePath, inside, uid_reason

DIRECTORY_STORAGE = "1.2.840.10008.1.3.10"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # and its .1-.4 multi-frame variants
STRUCTURED_REPORT = "1.2.840.10008.5.1.4.1.1.88."
ENCAPSULATED_DOCUMENT = "1.2.840.10008.5.1.4.1.1.104."
SCREEN_SAVE_TYPES = frozenset({"SCREEN SAVE", "SCREENSAVE", "SCREEN_SAVE", "SCREENSHOT"})
DOSE_TYPES = frozenset({"DOSE", "DOSE INFO", "DOSE_INFO", "DOSE REPORT", "DOSE_REPORT"})
PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
LINKED = {
    0x00100020: "patient_id",
    0x00100010: "patient_name",
    0x0020000D: "study_uid",
    0x0020000E: "series_uid",
}  # what the optional linkage table maps


class Quarantine(Exception):
    """A file that must not pass: ``reason`` is public, ``detail`` private."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail or reason


@dataclass
class FileResult:
    """Outcome for one input file, returned from a worker process."""

    rel: str  # input path relative to the input folder: PHI, private outputs only
    reason: str = ""  # empty when written
    detail: str = ""
    out_rel: str = ""
    patient: str = ""  # pseudonymous Patient ID
    study: str = ""
    series: str = ""
    audit: dict = field(default_factory=dict)
    evidence: Evidence = field(default_factory=Evidence)
    linkage: list[tuple[str, str, str]] = field(default_factory=list)
    names: set[str] = field(default_factory=set)  # components of the person names it holds
    words: frozenset[str] = frozenset()  # of its scrubbed descriptors (FileDeid.words)
    removed: frozenset[str] = frozenset()
    pairs: frozenset[tuple[str, str]] = frozenset()


def _fast_read(data: bytes) -> Dataset | None:
    """The common case without pydicom's file-meta machinery: ``DICM``, a group length, a
    transfer syntax; the dataset read by pydicom's ``read_dataset``. None: use ``dcmread``."""
    if len(data) < 144 or data[128:132] != b"DICM" or data[132:138] != b"\x02\x00\x00\x00UL":
        return None
    end = 144 + struct.unpack_from("<I", data, 140)[0]
    meta = read_dataset(DicomBytesIO(data[144:end]), False, True)
    syntax = meta._dict.get(0x00020010)
    if end > len(data) or syntax is None or not syntax.is_raw or not syntax.value:
        return None
    syntax = syntax.value.decode("ascii", "replace").strip("\x00 ")
    implicit, little = syntax == ImplicitVRLittleEndian, syntax != ExplicitVRBigEndian
    body = data[end:]
    if syntax == DeflatedExplicitVRLittleEndian:
        body = zlib.decompress(body, -zlib.MAX_WBITS)
    fp = DicomBytesIO(body)
    fp.is_implicit_VR, fp.is_little_endian = implicit, little
    ds = read_dataset(fp, implicit, little)
    ds.file_meta = FileMetaDataset(meta)
    return ds


def read_dicom(path: Path) -> Dataset:
    """Read a file or raise :class:`Quarantine` (not DICOM, no meta, truncated)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = None
            try:
                ds = _fast_read(path.read_bytes())
            except Exception:  # noqa: BLE001 - anything odd: pydicom's full reader decides
                ds = None
            ds = ds if ds is not None else dcmread(path)
        except InvalidDicomError as err:
            raise Quarantine(_no_meta_or_not_dicom(path), str(err)) from None
        except OSError as err:
            raise Quarantine("unreadable", f"{type(err).__name__}: {err.strerror}") from None
        except Exception as err:  # noqa: BLE001 - any parse failure is a reason, not a crash
            raise Quarantine("not_dicom", f"{type(err).__name__}: {err}") from None
    for w in caught:
        text = str(w.message).lower()
        if "end of file" in text or "truncat" in text or "eof" in text:
            raise Quarantine("truncated", str(w.message))
    if not getattr(ds, "file_meta", None) or "TransferSyntaxUID" not in ds.file_meta:
        raise Quarantine("missing_meta", "no file meta Transfer Syntax UID")
    _check_complete(ds)
    return ds


def _no_meta_or_not_dicom(path: Path) -> str:
    """A file without the DICM prefix: a bare dataset ('missing_meta') or not DICOM at all."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(path, force=True, stop_before_pixels=True)
        return "missing_meta" if "SOPClassUID" in ds or "SOPInstanceUID" in ds else "not_dicom"
    except Exception:  # noqa: BLE001
        return "not_dicom"


def _check_complete(ds) -> None:
    """pydicom reads truncated files silently: compare each raw length with what was read."""
    for tag, elem in ds._dict.items():
        if (
            getattr(elem, "is_raw", False)
            and elem.length != 0xFFFFFFFF
            and elem.value is not None
            and len(elem.value) < elem.length
        ):
            raise Quarantine("truncated", f"element {tag:08X} ends beyond the end of file")
    if (
        0x00280010 in ds._dict
        and 0x00280100 in ds._dict
        and not any(t in ds._dict for t in PIXEL_TAGS)
    ):
        raise Quarantine("truncated", "image attributes but no pixel data")


def gate(ds, burned_in_missing_ok: set[str]) -> None:
    """Raise :class:`Quarantine` for objects that must not leave the hospital as they are."""
    sop = text_of(ds, 0x00080016) or text_of(ds.file_meta, 0x00020002)
    if sop == DIRECTORY_STORAGE or 0x00041220 in ds._dict:  # DirectoryRecordSequence
        raise Quarantine("dicomdir", "DICOMDIR holds patient directory records")
    if sop == SECONDARY_CAPTURE or sop.startswith(SECONDARY_CAPTURE + "."):
        raise Quarantine("secondary_capture", f"SOP class {UID(sop).name}")
    image_type = {v.strip().upper() for v in text_of(ds, 0x00080008).split("\\")}
    if image_type & SCREEN_SAVE_TYPES:
        raise Quarantine("screen_save", "ImageType marks a screen save")
    if sop.startswith(STRUCTURED_REPORT):
        reason = "dose_report" if "dose" in UID(sop).name.lower() else "structured_report"
        raise Quarantine(reason, f"SOP class {UID(sop).name}")
    if image_type & DOSE_TYPES:
        raise Quarantine("dose_report", "ImageType marks a dose report")
    if sop.startswith(ENCAPSULATED_DOCUMENT):
        raise Quarantine("encapsulated_document", f"SOP class {UID(sop).name}")
    if any(t in ds._dict for t in PIXEL_TAGS):
        burned = text_of(ds, 0x00280301).upper()
        modality = text_of(ds, 0x00080060).upper()
        if burned and burned != "NO":
            raise Quarantine("burned_in_annotation", f"BurnedInAnnotation={burned}")
        if not burned and modality not in burned_in_missing_ok:
            raise Quarantine(
                "burned_in_annotation",
                f"no BurnedInAnnotation and modality {modality or '-'} may carry it",
            )
        if text_of(ds, 0x00280302).upper() == "YES":
            raise Quarantine("burned_in_annotation", "RecognizableVisualFeatures=YES")
    for tag, keyword in (
        (0x0020000D, "StudyInstanceUID"),
        (0x0020000E, "SeriesInstanceUID"),
        (0x00080018, "SOPInstanceUID"),
    ):
        value = text_of(ds, tag)
        if not value:
            raise Quarantine("missing_uids", f"no {keyword}")
        if uid_reason(value):
            raise Quarantine("bad_uid", f"{keyword}: {uid_reason(value)}")


def process_file(
    path: Path,
    rel: str,
    deid: Deidentifier,
    out_dir: Path,
    burned_in_missing_ok: set[str],
    keep_linkage: bool,
) -> FileResult:
    """Read, gate, de-identify and write one file; never raises for a bad input. The result
    holds the person names of the input too (quarantined or not)."""
    result = FileResult(rel=rel)
    try:
        try:
            ds = read_dicom(path)
        except Quarantine:
            result.names = names_of_file(path)
            raise
        result.names = set(name_parts(ds))
        gate(ds, burned_in_missing_ok)
        original = [text_of(ds, t) for t in LINKED]
        try:
            state = deid.deidentify(ds)
            result.evidence = state.evidence  # even if writing fails: the kept-value cache saw it
            result.words, result.removed = frozenset(state.words), state.removed
            result.pairs = frozenset(state.pairs)
        except BadVR as err:
            raise Quarantine("bad_vr", str(err)) from None
        except Quarantine:
            raise
        except Exception as err:  # noqa: BLE001 - pydicom raises many types for odd values
            raise Quarantine("unsupported", f"{type(err).__name__}: {err}") from None
        result.study, result.series = text_of(ds, 0x0020000D), text_of(ds, 0x0020000E)
        result.patient = text_of(ds, 0x00100020)
        result.out_rel = f"dicom/{result.study}/{result.series}/{text_of(ds, 0x00080018)}.dcm"
        try:
            path = inside(out_dir, out_dir / result.out_rel)
        except UnsafePath as err:
            raise Quarantine("unsafe_path", str(err)) from None
        try:
            write_file(path, deid.encode(ds))
        except Exception as err:  # noqa: BLE001
            raise Quarantine("write_failed", f"{type(err).__name__}: {err}") from None
    except Quarantine as q:
        result.reason, result.detail = q.reason, q.detail
        return result
    result.audit = {
        "file": result.out_rel,
        "sop_class": text_of(ds, 0x00080016),
        "modality": text_of(ds, 0x00080060),
        **{f"n_{a}": state.counts.get(a, 0) for a in "DZXCU"},
        "n_private_removed": state.counts.get("private_removed", 0),
        "n_private_kept": state.counts.get("private_kept", 0),
        "n_meta_replaced": state.counts.get("meta_replaced", 0),
        "actions": ";".join(sorted(state.applied)),
    }
    if keep_linkage:
        result.linkage = [
            (kind, old, text_of(ds, tag)) for (tag, kind), old in zip(LINKED.items(), original)
        ]
    return result


# MetaImage header keys copied through; any other key (free text, names, dates) is dropped.
MHD_KEYS = frozenset(
    {
        "ObjectType",
        "NDims",
        "BinaryData",
        "BinaryDataByteOrderMSB",
        "ElementByteOrderMSB",
        "CompressedData",
        "CompressedDataSize",
        "TransformMatrix",
        "Rotation",
        "Orientation",
        "Offset",
        "Position",
        "Origin",
        "CenterOfRotation",
        "AnatomicalOrientation",
        "ElementSpacing",
        "ElementSize",
        "DimSize",
        "HeaderSize",
        "ElementNumberOfChannels",
        "ElementType",
        "ElementMin",
        "ElementMax",
        "ElementDataFile",
    }
)


def copy_mhd(mhd: Path, out_images: Path, new_uid: str) -> tuple[list[Path], int]:
    """Copy a LUNA16 ``<seriesuid>.mhd`` + data file as ``<new_uid>.mhd`` + ``<new_uid>.raw``.

    Returns the written paths and the number of header keys dropped.

    Raises:
        Quarantine: the file name is not a series UID, the header names no single data file in
            its folder, or an output would lie outside ``out_images``' parent.
    """
    if uid_reason(mhd.stem):  # LUNA16 names a volume by its series UID
        raise Quarantine("bad_uid", f"file name: {uid_reason(mhd.stem)}")
    lines, dropped, data_file = [], 0, None
    for line in mhd.read_text(encoding="latin-1").splitlines():
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or key not in MHD_KEYS:
            dropped += bool(line.strip())
            continue
        if key == "ElementDataFile":
            name = value.strip()
            data_file = mhd.parent / name
            try:  # the header names the file: it must lie in the header's folder (links resolved)
                inside(mhd.parent, data_file)
            except UnsafePath as err:
                raise Quarantine("unsafe_path", f"{mhd.name}: data file {err}") from None
            if name.upper() in ("LIST", "LOCAL") or not data_file.is_file():
                raise Quarantine("not_dicom", f"{mhd.name}: data file {name} not found")
            value = f"{new_uid}{data_file.suffix}"
        lines.append(f"{key} = {value.strip()}")
    if data_file is None:
        raise Quarantine("not_dicom", f"{mhd.name}: no ElementDataFile")
    try:
        out_header = inside(out_images.parent, out_images / f"{new_uid}.mhd")
        out_data = inside(out_images.parent, out_images / f"{new_uid}{data_file.suffix}")
    except UnsafePath as err:
        raise Quarantine("unsafe_path", str(err)) from None
    with atomic_path(out_data) as tmp:
        shutil.copyfile(data_file, tmp)
    with atomic_path(out_header) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="ascii")
    return [out_header, out_data], dropped
