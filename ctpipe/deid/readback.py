"""The leak gate's own reader of written files: every value of every element, at every depth.

A small parser, not pydicom (which the writer relies on, so a bug there would hide itself): it
walks tags, VRs and lengths in the file's transfer syntax, checks the zero preamble and the
``DICM`` prefix, and returns each value normalised (:func:`norm`), multi-values split. Left out:
bulk pixel and waveform data, numeric binary VRs, and OB/UN values longer than ``MAX_BINARY``
bytes. What is looked for in them: :mod:`ctpipe.deid.verify`.
"""

from __future__ import annotations

import struct
import zlib

from pydicom.datadict import dictionary_VR

BULK_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009, 0x54001010, 0x56000020})
NUMERIC_VRS = frozenset(
    {
        "US",
        "SS",
        "UL",
        "SL",
        "FL",
        "FD",
        "SV",
        "UV",
        "AT",
        "OF",
        "OD",
        "OL",
        "OV",
        "OW",
        "US or SS",
        "US or OW",
        "US or SS or OW",
        "OB or OW",
    }
)
MAX_BINARY = 4096
UNDEFINED = 0xFFFFFFFF
LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
TEXT_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "UC"})
STRIP = " \x00\t\r\n"
_UNPACK = {e: tuple(struct.Struct(e + f).unpack_from for f in ("HHI", "H", "I")) for e in "<>"}


def norm(value: bytes | str) -> str:
    """One comparable form for raw bytes and text: latin-1 decoded, stripped, lower case."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return value.strip(STRIP).lower()


def dictionary_vr(tag: int) -> str:
    """The data dictionary's VR of a public tag; UN for private (odd group) or unknown tags."""
    if tag >> 16 & 1:
        return "UN"
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


def file_values(data: bytes, texts: list[tuple[int, str, str]] | None = None) -> list[str]:
    """Normalised values of every element of a DICOM file, meta included, at every depth
    (and, into ``texts``, every text-VR element as ``(tag, VR, value)``).

    A small parser of its own (not pydicom, which the writer relies on): it walks tags, VRs and
    lengths in the file's transfer syntax and checks the zero preamble and the ``DICM`` prefix.
    """
    if data[128:132] != b"DICM":
        raise ValueError("no DICM prefix")
    if any(data[:128]):
        raise ValueError("preamble not zeroed")
    out: list[str] = []
    meta_end = 132 + 12 + struct.unpack_from("<I", data, 140)[0]
    _parse(data, 132, meta_end, False, True, out)
    syntax = next((v for v in out if v.startswith("1.2.840.10008.1.2")), "")
    body = data[meta_end:]
    if syntax == "1.2.840.10008.1.2.1.99":
        body = zlib.decompress(body, -zlib.MAX_WBITS)
    implicit, little = syntax == "1.2.840.10008.1.2", syntax != "1.2.840.10008.1.2.2"
    _parse(body, 0, len(body), implicit, little, out, texts)
    return out


def _parse(
    buf: bytes,
    pos: int,
    end: int,
    implicit: bool,
    little: bool,
    out: list[str],
    texts: list[tuple[int, str, str]] | None = None,
) -> int:
    """Collect values from ``pos`` to ``end`` or to an item delimiter; return the new position.

    ``texts`` (if given) also gets ``(tag, VR, value)`` of every text-VR element, case kept.
    """
    e = "<" if little else ">"
    head, short, long = _UNPACK[e]
    while pos + 8 <= end:
        group, element, length = head(buf, pos)
        tag = group << 16 | element
        if group == 0xFFFE:
            if element in (0xE00D, 0xE0DD):
                return pos + 8
            raise ValueError(f"unexpected item tag at {pos}")
        if implicit:
            vr, pos = None, pos + 8
        else:
            vr = buf[pos + 4 : pos + 6].decode("latin-1")
            if vr in LONG_VRS:
                length = long(buf, pos + 8)[0]
                pos += 12
            else:
                length = short(buf, pos + 6)[0]
                pos += 8
        if vr is None:
            vr = _implicit_vr(tag, buf, pos, length, e)
        if vr == "SQ" or (vr == "UN" and length == UNDEFINED):
            as_implicit = implicit or vr == "UN"  # UN of undefined length: implicit VR LE
            pos = _sequence(buf, pos, length, as_implicit, little or vr == "UN", out, texts)
            continue
        if length == UNDEFINED:  # encapsulated pixel data: skip the fragments
            pos = _sequence(buf, pos, length, implicit, little, None)
            continue
        if pos + length > end:
            raise ValueError(f"element {tag:08X} runs past the end")
        if (
            tag not in BULK_TAGS
            and vr not in NUMERIC_VRS
            and not (vr in ("OB", "UN") and length > MAX_BINARY)
        ):
            value = buf[pos : pos + length].decode("latin-1")
            if texts is not None and vr in TEXT_VRS and length:
                texts.append((tag, vr, value))
            for part in value.split("\\") if "\\" in value else (value,):
                if part := part.strip(STRIP).lower():  # norm(part)
                    out.append(part)
        pos += length
    return pos


def _sequence(
    buf: bytes,
    pos: int,
    length: int,
    implicit: bool,
    little: bool,
    out: list[str] | None,
    texts: list[tuple[int, str, str]] | None = None,
) -> int:
    """Walk the items of a sequence (or skip pixel fragments when ``out`` is None)."""
    e = "<" if little else ">"
    end = len(buf) if length == UNDEFINED else pos + length
    while pos + 8 <= end:
        group, element, item_length = struct.unpack_from(e + "HHI", buf, pos)
        pos += 8
        if (group, element) == (0xFFFE, 0xE0DD):
            return pos
        if (group, element) != (0xFFFE, 0xE000):
            raise ValueError(f"malformed sequence at {pos - 8}")
        if out is None or item_length != UNDEFINED:
            if out is not None:
                _parse(buf, pos, pos + item_length, implicit, little, out, texts)
            pos += item_length
        else:
            pos = _parse(buf, pos, len(buf), implicit, little, out, texts)
    return pos


def _implicit_vr(tag: int, buf: bytes, pos: int, length: int, e: str) -> str:
    """VR of an implicit-VR element: the dictionary's, or SQ when its value is items."""
    if length == UNDEFINED or (
        length >= 8 and struct.unpack_from(e + "HH", buf, pos) == (0xFFFE, 0xE000)
    ):
        return "SQ"
    return dictionary_vr(tag)
