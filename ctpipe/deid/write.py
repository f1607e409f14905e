"""Byte-level reading and writing of element values for the de-identifier.

pydicom decodes an element on first access and re-encodes every element on write, at tens of
microseconds each; that, not the profile, dominated de-identification time. Here the elements the
stage changes are replaced by new raw elements (bytes already encoded in the file's transfer
syntax and character set), and :class:`Encoder` writes a dataset by concatenating element
headers and raw values: unchanged elements are copied byte for byte, so the pixel data and
geometry cannot change. Anything still decoded (a sequence the walk entered, an element pydicom
decoded) is encoded item by item, falling back to pydicom's writer for exotic values.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

from pydicom.charset import decode_bytes, encode_string
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.tag import BaseTag
from pydicom.uid import DeflatedExplicitVRLittleEndian

from ctpipe.deid.verify import raw_vr

LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
NUMBER_FORMATS = {
    "US": "H",
    "SS": "h",
    "UL": "I",
    "SL": "i",
    "FL": "f",
    "FD": "d",
    "SV": "q",
    "UV": "Q",
}
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


def text(elem, ds: Dataset) -> str:
    """The value of a string element as one str (multi-values joined by backslashes)."""
    value = elem.value
    if value is None:
        return ""
    if isinstance(value, bytes):
        if value.isascii():
            return value.decode("ascii").rstrip("\x00 ")
        return decode_bytes(value, ds._character_set, {0x5C, 0x5E, 0x3D}).rstrip("\x00 ")
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def text_of(ds: Dataset, tag: int) -> str:
    """``text`` of ``ds[tag]`` without decoding the element ('' when absent)."""
    elem = ds._dict.get(tag)
    return text(elem, ds).strip() if elem is not None else ""


def set_raw(ds: Dataset, tag: int, vr: str, value: bytes, enc: tuple[bool, bool]) -> None:
    """Replace ``ds[tag]`` by a raw element holding ``value`` (padded to an even length).

    ``enc`` is the file's ``(is_implicit_VR, is_little_endian)``.
    """
    if len(value) % 2:
        value += b"\x00" if vr in ("UI", "OB", "UN") else b" "
    ds._dict[BaseTag(tag)] = RawDataElement(BaseTag(tag), vr, len(value), value, 0, *enc)


def set_text(ds: Dataset, tag: int, vr: str, value: str, enc: tuple[bool, bool]) -> None:
    """Replace a string element's value, encoded in the dataset's character set."""
    data = value.encode("ascii") if value.isascii() else encode_string(value, ds._character_set)
    set_raw(ds, tag, vr, data, enc)


def set_number(ds: Dataset, tag: int, vr: str, enc: tuple[bool, bool]) -> None:
    """Replace a binary numeric element by a single zero."""
    fmt = NUMBER_FORMATS.get(vr)
    set_raw(ds, tag, vr, struct.pack(("<" if enc[1] else ">") + fmt, 0) if fmt else b"", enc)


class Encoder:
    """Encodes datasets in one transfer syntax from raw element bytes."""

    def __init__(self, implicit: bool, little: bool) -> None:
        self.implicit, self.endian = implicit, "<" if little else ">"

    def header(self, tag: int, vr: str | None, length: int) -> bytes:
        group, element = tag >> 16, tag & 0xFFFF
        if self.implicit or vr is None:
            return struct.pack(self.endian + "HHI", group, element, length)
        if vr in LONG_VRS:
            return struct.pack(self.endian + "HH2sHI", group, element, vr.encode(), 0, length)
        return struct.pack(self.endian + "HH2sH", group, element, vr.encode(), length)

    def delimiter(self, tag: int) -> bytes:
        return struct.pack(self.endian + "HHI", tag >> 16, tag & 0xFFFF, 0)

    def dataset(self, ds: Dataset) -> bytes:
        return b"".join(self.element(ds, tag, ds._dict[tag]) for tag in sorted(ds._dict))

    def element(self, ds: Dataset, tag: int, elem) -> bytes:
        vr = elem.VR
        if elem.is_raw and (elem.is_implicit_VR, elem.is_little_endian) != (
            self.implicit,
            self.endian == "<",
        ):
            # Raw bytes in another encoding: the items of a sequence that was stored as UN
            # (always implicit VR little endian). Same byte order: only the VR needs looking up.
            vr = None if self.implicit else raw_vr(elem, tag)
            if elem.is_little_endian != (self.endian == "<") or (vr and " or " in vr):
                elem = ds[tag]  # decode it and let pydicom encode it below
        if elem.is_raw:
            value = elem.value or b""
            if elem.length == UNDEFINED:
                return self.header(tag, vr, UNDEFINED) + value + self.delimiter(SEQUENCE_END)
            if not self.implicit and vr and vr not in LONG_VRS and len(value) > 0xFFFF:
                vr = "UN"  # PS3.5 6.2.2: too long for a 16-bit length
            return self.header(tag, vr, len(value)) + value
        if vr == "SQ":
            items = [
                self.header(ITEM, None, UNDEFINED) + self.dataset(item) + self.delimiter(ITEM_END)
                for item in elem.value or []
            ]
            return (
                self.header(tag, "SQ", UNDEFINED) + b"".join(items) + self.delimiter(SEQUENCE_END)
            )
        buffer = DicomBytesIO()  # a value pydicom decoded: let pydicom encode it
        buffer.is_implicit_VR, buffer.is_little_endian = self.implicit, self.endian == "<"
        write_data_element(buffer, elem, ds._character_set)
        return buffer.getvalue()


def _meta_element(tag: int, vr: str, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00" if vr in ("UI", "OB") else b" "
    return Encoder(False, True).header(tag, vr, len(value)) + value


def encode_file(
    ds: Dataset,
    sop_class: str,
    sop_instance: str,
    transfer_syntax: str,
    implementation: tuple[str, str],
) -> bytes:
    """Zero preamble, ``DICM``, fresh file meta, then the dataset in its transfer syntax."""
    meta = b"".join(
        [
            _meta_element(0x00020001, "OB", b"\x00\x01"),
            _meta_element(0x00020002, "UI", sop_class.encode("ascii")),
            _meta_element(0x00020003, "UI", sop_instance.encode("ascii")),
            _meta_element(0x00020010, "UI", transfer_syntax.encode("ascii")),
            _meta_element(0x00020012, "UI", implementation[0].encode("ascii")),
            _meta_element(0x00020013, "SH", implementation[1].encode("ascii")),
        ]
    )
    group_length = _meta_element(0x00020000, "UL", struct.pack("<I", len(meta)))
    implicit = transfer_syntax == "1.2.840.10008.1.2"
    little = transfer_syntax != "1.2.840.10008.1.2.2"
    body = Encoder(implicit, little).dataset(ds)
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        packer = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
        body = packer.compress(body) + packer.flush()
    return b"\x00" * 128 + b"DICM" + group_length + meta + body


def write_file(path: Path, data: bytes) -> None:
    """Write bytes atomically (temporary name in the same folder, then ``os.replace``).

    Lighter than :func:`ctpipe.fileio.atomic_path` for thousands of small files: one open, and
    the folder created only when the open finds it missing.
    """
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        try:
            tmp.write_bytes(data)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
