"""Leak verification: scan de-identified files for every identifying value found in the input.

While de-identifying, each file reports *evidence* (normalised strings, see :func:`norm`):

- ``ident``: values of attributes the profile removes, empties, replaces or shifts (names and
  their components, IDs, addresses, dates, times, UIDs, device and institution names);
- ``weak``: values that identify less directly (private elements, removed free text and coded
  strings);
- ``kept``: values the profile lets through unchanged; ``cleaned``: cleaned descriptors as written;
  ``produced``: values the stage generated from input values (shifted dates).

The rule that turns evidence into needles (documented, and the same for cleaning and scanning):

1. A value is a needle when it has at least ``min_chars`` characters and is not a generic word
   (:data:`GENERIC`). Values with a letter are *text* needles, matched as a whole-word sequence,
   case-insensitively, inside any value (``"DOE^JANE"`` is found in ``"seen by Doe, Jane"`` but
   not in ``"Jane Doe"``; its components of ``min_chars`` or more are needles of their own, so
   ``"JANE"`` is). Values without a letter (dates, times, UIDs, numbers) are
   *numeric* needles, matched against whole values (or one value of a multi-valued element, or
   the date part of a DT); all-digit ones of 6 or more digits also as a word inside text.
2. A needle is dropped when the profile itself lets it through: when it matches inside a value of
   a kept attribute of the same patient; ``weak`` ones also when they match inside a cleaned
   descriptor; numeric ones when they equal a value the stage produced (a shifted date that
   happens to equal another original date of the same patient).
3. Needles are checked in every output file of the same patient (shifted dates of one patient can
   legitimately equal real dates of another); text needles of two words or more (full names,
   addresses, institutions) are also checked in every other patient's files.

Scanned: every element at every depth, file meta included, as its raw bytes (so every character
set is compared in one space) read back from the written file by a small parser of this module,
except bulk pixel and waveform data, numeric binary VRs, and OB/UN values longer than
``MAX_BINARY`` bytes. A file that does not parse counts as a failure. Output file names and the
pushable CSV/JSON outputs are scanned too (text needles and UIDs of every patient).

Why ``min_chars`` (4 by default): shorter values ("M", "F", "CT", "1", "YES") occur in any file
for reasons that have nothing to do with the patient; they would raise false alarms and stop the
pipeline, while identifying nothing.
"""

from __future__ import annotations

import re
import struct
import zlib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.datadict import DicomDictionary, dictionary_VR

from ctpipe.deid.freetext import pattern_matches

WORD = re.compile(r"[0-9a-z\x80-\xff]+")
SEPARATOR = " \xa0\xa0 "  # between values, so no word sequence spans two values
LETTER = re.compile(r"[a-z\x80-\xff]")
GENERIC = frozenset(
    {
        "anonymous",
        "anonymized",
        "anonymised",
        "unknown",
        "none",
        "null",
        "n/a",
        "other",
        "removed",
        "deleted",
        "dummy",
        "test",
        "patient",
        "yes",
        "no",
        "true",
        "false",
        "0000",
    }
)
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
DIGIT_WORD = 6
TEXT_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "UC"})
NARRATIVE_VRS = frozenset({"ST", "LT", "UT"})  # checked for patterns wherever they are


def norm(value: bytes | str) -> str:
    """One comparable form for raw bytes and text: latin-1 decoded, stripped, lower case."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return value.strip(" \x00\t\r\n").lower()


def raw_vr(elem, tag: int) -> str:
    """VR of a raw or decoded element; implicit VR files, and public elements stored as UN, look
    it up in the dictionary (private -> UN)."""
    vr = elem.VR
    if vr and vr != "UN":
        return str(vr)
    return _dictionary_vr(tag)


def _dictionary_vr(tag: int) -> str:
    """The data dictionary's VR of a public tag; UN for private (odd group) or unknown tags."""
    if tag >> 16 & 1:
        return "UN"
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


def element_strings(elem, tag: int) -> list[str]:
    """Normalised values of one non-sequence element (multi-values split), for evidence/scans."""
    vr = raw_vr(elem, tag)
    if vr in NUMERIC_VRS or tag in BULK_TAGS:
        return []
    value = elem.value
    if value is None:
        return []
    if getattr(elem, "is_raw", False) or isinstance(value, bytes):
        if not isinstance(value, bytes):
            return []
        if vr in ("OB", "UN") and len(value) > MAX_BINARY:
            return []
        return [s for s in (norm(p) for p in value.split(b"\\")) if s]
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [s for s in (norm(str(v)) for v in value) if s]
    return [s for s in (norm(p) for p in str(value).split("\\")) if s]


@dataclass
class Evidence:
    """Normalised values reported for one patient (merged over that patient's files)."""

    ident: set[str] = field(default_factory=set)
    weak: set[str] = field(default_factory=set)
    kept: set[str] = field(default_factory=set)
    cleaned: set[str] = field(default_factory=set)
    produced: set[str] = field(default_factory=set)

    def update(self, other: Evidence) -> None:
        for name in ("ident", "weak", "kept", "cleaned", "produced"):
            getattr(self, name).update(getattr(other, name))


def needle(value: str, min_chars: int) -> tuple[str, ...] | str | None:
    """A text needle (word tuple), a numeric needle (the string) or None (too weak)."""
    if len(value) < min_chars or value in GENERIC:
        return None
    if LETTER.search(value):
        words = tuple(WORD.findall(value))
        return words if words and len("".join(words)) >= min_chars else None
    return value


class NeedleIndex:
    """Needles to look for: text ones by first word, numeric ones as a set."""

    def __init__(self, needles: Iterable[tuple[str, ...] | str] = ()) -> None:
        self.text: dict[str, set[tuple[str, ...]]] = defaultdict(set)
        self.exact: set[str] = set()
        self.digit_words: set[str] = set()
        for n in needles:
            self.add(n)

    def add(self, n: tuple[str, ...] | str) -> None:
        if isinstance(n, tuple):
            self.text[n[0]].add(n)
        else:
            self.exact.add(n)
            if n.isdigit() and len(n) >= DIGIT_WORD:
                self.digit_words.add(n)

    def __len__(self) -> int:
        return sum(map(len, self.text.values())) + len(self.exact)

    def hits(self, values: Iterable[str]) -> set[tuple[str, ...] | str]:
        """Needles found in ``values`` (normalised strings)."""
        values = list(values)
        unique = set(values)
        found: set[tuple[str, ...] | str] = set()
        if self.exact:
            found |= unique & self.exact
            found |= {v[:8] for v in unique if len(v) > 8 and v[:8].isdigit()} & self.exact
        words = WORD.findall(SEPARATOR.join(values))  # the separator is a word no needle has
        if self.digit_words:
            found |= self.digit_words.intersection(words)
        starts = self.text.keys() & set(words)
        for i, w in enumerate(words):
            if w in starts:
                for tup in self.text[w]:
                    if tuple(words[i : i + len(tup)]) == tup:
                        found.add(tup)
        return found


def build_indexes(
    evidence: dict[str, Evidence], min_chars: int
) -> tuple[dict[str, NeedleIndex], NeedleIndex]:
    """Per-patient needle indexes and the cross-patient index (multi-word text needles)."""
    per_patient: dict[str, NeedleIndex] = {}
    cross: set[tuple[str, ...] | str] = set()
    all_kept: set[str] = set()
    for ev in evidence.values():
        all_kept.update(ev.kept)
    for patient, ev in evidence.items():
        strong = {n for n in (needle(v, min_chars) for v in ev.ident) if n}
        weak = {n for n in (needle(v, min_chars) for v in ev.weak) if n} - strong
        strong -= NeedleIndex(strong).hits(ev.kept)
        weak -= NeedleIndex(weak).hits(ev.kept | ev.cleaned)
        index = NeedleIndex(n for n in strong | weak if n not in ev.produced)
        per_patient[patient] = index
        cross.update(n for n in strong if isinstance(n, tuple) and len(n) > 1)
    return per_patient, NeedleIndex(cross - NeedleIndex(cross).hits(all_kept))


@dataclass
class FreeTextCheck:
    """What the gate looks for in free text whoever's file it is (:mod:`ctpipe.deid.freetext`):
    the patterns, and the cohort's person-name components (``names``, single-word needles).

    Checked: the Clean Descriptors column's attributes (``tags``) and ST/LT/UT anywhere.
    """

    tags: frozenset[int] = frozenset()
    names: NeedleIndex = field(default_factory=NeedleIndex)

    def findings(self, texts: Iterable[tuple[int, str, str]]) -> list[str]:
        out = []
        for tag, vr, value in texts:
            if vr not in NARRATIVE_VRS and tag not in self.tags:
                continue
            where = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
            out += [f"{kind} {match!r} in {where}" for kind, match in pattern_matches(value)]
            out += [f"cohort name {n!r} in {where}" for n in self.names.hits([norm(value)])]
        return out


def name_index(components: Iterable[str], min_chars: int) -> NeedleIndex:
    """Single-word needles of the cohort's name components (also as UTF-8 bytes read as latin-1,
    the form the gate reads raw values in)."""
    index = NeedleIndex()
    for c in components:
        for form in {c, c.encode("utf-8").decode("latin-1")}:
            n = needle(norm(form), min_chars)
            if isinstance(n, tuple) and len(n) == 1:
                index.add(n)
    return index


def scan_file(
    path: Path, indexes: list[NeedleIndex], free_text: FreeTextCheck | None = None
) -> list[str]:
    """Leaks in one written DICOM file: needles found in its values, pattern or cohort-name hits
    in its free text, or an unreadable file."""
    texts: list[tuple[int, str, str]] = []
    try:
        values = file_values(path.read_bytes(), texts)
    except (ValueError, struct.error, zlib.error) as err:
        return [f"unreadable output: {err}"]
    found: set = set()
    for index in indexes:
        found |= index.hits(values)
    out = [f"value {n!r}" for n in sorted(found, key=str)]
    return out + (free_text.findings(texts) if free_text else [])


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
    while pos + 8 <= end:
        group, element, length = struct.unpack_from(e + "HHI", buf, pos)
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
                length = struct.unpack_from(e + "I", buf, pos + 8)[0]
                pos += 12
            else:
                length = struct.unpack_from(e + "H", buf, pos + 6)[0]
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
            out.extend(s for s in (norm(p) for p in buf[pos : pos + length].split(b"\\")) if s)
            if texts is not None and vr in TEXT_VRS and length:
                texts.append((tag, vr, buf[pos : pos + length].decode("latin-1")))
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
    return _dictionary_vr(tag)


def scan_text(values: Iterable[str], indexes: list[NeedleIndex]) -> list[str]:
    """Leaks among plain strings (file-name parts, CSV cells): the same matching as files."""
    normalised = [norm(v) for v in values]
    found: set = set()
    for index in indexes:
        found |= index.hits(normalised)
    return [f"value {n!r}" for n in sorted(found, key=str)]


def known_public(tag: int) -> bool:
    """Whether pydicom's data dictionary knows this public tag."""
    return tag in DicomDictionary
