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
set is compared in one space) read back from the written file by a small parser of its own
(:mod:`ctpipe.deid.readback`), except bulk pixel and waveform data, numeric binary VRs, and OB/UN
values longer than ``MAX_BINARY`` bytes. A file that does not parse counts as a failure. Output file names and the
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

from pydicom.datadict import DicomDictionary

from ctpipe.deid.freetext import pattern_matches
from ctpipe.deid.readback import (
    BULK_TAGS,
    MAX_BINARY,
    NUMERIC_VRS,
    dictionary_vr,
    file_values,
    norm,
)

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
DIGIT_WORD = 6
NARRATIVE_VRS = frozenset({"ST", "LT", "UT"})  # checked for patterns wherever they are


def raw_vr(elem, tag: int) -> str:
    """VR of a raw or decoded element; implicit VR files, and public elements stored as UN, look
    it up in the dictionary (private -> UN)."""
    vr = elem.VR
    if vr and vr != "UN":
        return str(vr)
    return dictionary_vr(tag)


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
        return self.found_in(*haystack(values))

    def found_in(self, unique: set[str], words: list[str], word_set: set[str]) -> set:
        """:meth:`hits` in values already split (:func:`haystack`, once for several indexes)."""
        found: set[tuple[str, ...] | str] = set()
        if self.exact:
            found |= unique & self.exact
            found |= {v[:8] for v in unique if len(v) > 8 and v[:8].isdigit()} & self.exact
        if self.digit_words:
            found |= self.digit_words & word_set
        starts = self.text.keys() & word_set
        for i in [i for i, w in enumerate(words) if w in starts] if starts else ():
            for tup in self.text[words[i]]:
                if tuple(words[i : i + len(tup)]) == tup:
                    found.add(tup)
        return found


def haystack(values: Iterable[str]) -> tuple[set[str], list[str], set[str]]:
    """Normalised values as :meth:`NeedleIndex.found_in` takes them: the distinct values, and
    their words in order (the separator between values is a word no needle has) and as a set."""
    values = list(values)
    words = WORD.findall(SEPARATOR.join(values))
    return set(values), words, set(words)


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
        strong, per_patient[patient] = _patient_index(ev, min_chars)
        cross.update(n for n in strong if isinstance(n, tuple) and len(n) > 1)
    return per_patient, NeedleIndex(cross - NeedleIndex(cross).hits(all_kept))


def updated_indexes(
    indexes: tuple[dict[str, NeedleIndex], NeedleIndex],
    before: dict[str, Evidence],
    after: dict[str, Evidence],
    min_chars: int,
) -> tuple[dict[str, NeedleIndex], NeedleIndex]:
    """:func:`build_indexes` of ``after``, from ``indexes`` (those of ``before``): the patients
    whose evidence changed are indexed again; all of it when that changes what the cross-patient
    index is made of (a patient's identifying or kept values, or the patients themselves)."""
    changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    if any(
        p not in before
        or p not in after
        or (before[p].ident, before[p].kept) != (after[p].ident, after[p].kept)
        for p in changed
    ):
        return build_indexes(after, min_chars)
    per_patient, cross = indexes
    return {**per_patient, **{p: _patient_index(after[p], min_chars)[1] for p in changed}}, cross


def _patient_index(ev: Evidence, min_chars: int) -> tuple[set, NeedleIndex]:
    """A patient's strong needles (the cross-patient index takes its multi-word ones) and the
    patient's index: strong and weak needles not found in what was kept (weak: nor cleaned), nor
    among the values the de-identification produced."""
    strong = {n for n in (needle(v, min_chars) for v in ev.ident) if n}
    weak = {n for n in (needle(v, min_chars) for v in ev.weak) if n} - strong
    strong -= NeedleIndex(strong).hits(ev.kept)
    weak -= NeedleIndex(weak).hits(ev.kept | ev.cleaned)
    return strong, NeedleIndex(n for n in strong | weak if n not in ev.produced)


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
    split = haystack(values)
    for index in indexes:
        found |= index.found_in(*split)
    out = [f"value {n!r}" for n in sorted(found, key=str)]
    return out + (free_text.findings(texts) if free_text else [])


def scan_text(values: Iterable[str], indexes: list[NeedleIndex]) -> list[str]:
    """Leaks among plain strings (file-name parts, CSV cells): the same matching as files."""
    split = haystack(norm(v) for v in values)
    found: set = set()
    for index in indexes:
        found |= index.found_in(*split)
    return [f"value {n!r}" for n in sorted(found, key=str)]


def known_public(tag: int) -> bool:
    """Whether pydicom's data dictionary knows this public tag."""
    return tag in DicomDictionary
