"""Free text that cannot leak: which descriptors survive, and what is scrubbed out of them.

A name typed into a comment ("seen by Dr Fenwick Oddsworth on ward 7") is in no header, so no
list of known values finds it. The default is therefore safe without knowing the name:

1. **Removed**: every free-text attribute of the Clean Descriptors column of Table E.1-1 that is
   not on the allow-list (``anonymize.keep_descriptors``: the descriptors the pipeline uses). That
   removes comments, histories, reasons, notes and labels whatever they say.
2. **Kept and scrubbed** (Clean Descriptors on): the allow-listed descriptors, with every match of
   :data:`PATTERNS` removed (PN-formatted tokens, titled names, e-mail addresses, phone numbers,
   dates, identifiers and UIDs), then every identifying value of the same file, then every
   component of every person name seen anywhere in the cohort (:func:`name_components`).
3. The leak gate (:mod:`ctpipe.deid.verify`) looks for the same patterns and the same cohort names
   in every free-text value it reads back, not only for the known values.

What remains possible: a name in an allow-listed descriptor that is in no header, has no title
and no ``^``; hence the short allow-list (set it to ``[]`` to remove every descriptor).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

# Descriptors kept by default (with Clean Descriptors on): what series selection, the model card
# and drift monitoring read. Everything else of the Clean Descriptors column is removed.
DEFAULT_KEEP_DESCRIPTORS = (
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
    "ContrastBolusAgent",
    "AcquisitionDeviceProcessingDescription",
    "DerivationDescription",
    "RequestedProcedureDescription",
)
TITLES = r"(?i:dr|drs|doctor|prof|professor|mr|mrs|ms|miss|mx|sir|dame|sister|nurse|rev)"
MONTHS = r"(?i:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?"  # January, Jan.
# name -> pattern; applied in this order (a titled name before the generic identifier rule).
PATTERNS: dict[str, re.Pattern] = {
    "e-mail address": re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"),
    "person name (PN format)": re.compile(r"[^\s\\,;:()\[\]]*\^[^\s\\,;:()\[\]]*"),
    "titled name": re.compile(rf"(?<![^\W_]){TITLES}\b\.?(?:\s+[A-Z][\w'\u2019-]*\.?){{1,3}}"),
    "date": re.compile(
        r"(?<!\d)(?:(?:19|20)\d\d[-/.]?(?:0[1-9]|1[0-2])[-/.]?(?:0[1-9]|[12]\d|3[01])"
        r"|\d{1,2}[-/.]\d{1,2}[-/.](?:19|20)?\d\d)(?!\d)"
        rf"|\b\d{{1,2}}(?:st|nd|rd|th)?\s+{MONTHS}\s+(?:19|20)\d\d\b"
        rf"|\b{MONTHS}\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+(?:19|20)\d\d\b"
    ),
    "UID": re.compile(r"(?<![\w.])\d+(?:\.\d+){3,}(?![\w.])"),
    "phone number": re.compile(r"(?<![\w.])\+?(?:\(?\d[\d ()./-]{5,}\d)(?![\w.])"),
    "identifier": re.compile(r"#\s*\d+|\b[^\W_]*\d{5,}[^\W_]*\b"),
}
PHONE_DIGITS = 7  # a "phone number" match with fewer digits is a measurement ("1.25 / 5 mm")
# Name particles: identify nobody on their own and occur in ordinary text.
PARTICLES = frozenset(
    "al ap bin da das de del della der di dos du el la le van von y zu anonymized anonymous".split()
)
SPACES = re.compile(r"\s{2,}")
REPEATED_SEPARATORS = re.compile(r"\s*([,;:])(?:\s*[,;:])+")


def _matches(value: str) -> Iterator[tuple[str, re.Match]]:
    """(pattern name, match) of every :data:`PATTERNS` match in ``value``; phone-like runs of
    fewer than :data:`PHONE_DIGITS` digits are measurements, not matches."""
    for name, pattern in PATTERNS.items():
        for m in pattern.finditer(value):
            if name != "phone number" or sum(c.isdigit() for c in m.group()) >= PHONE_DIGITS:
                yield name, m


def pattern_matches(value: str) -> list[tuple[str, str]]:
    """(pattern name, matched text) of every match in ``value`` (what the leak gate reports)."""
    return [(name, m.group().strip()) for name, m in _matches(value)]


def pattern_spans(value: str) -> list[tuple[int, int]]:
    """(start, end) of every match in ``value`` (what :func:`scrub` removes)."""
    return [m.span() for _, m in _matches(value)]


def scrub(value: str, terms: Iterable[re.Pattern | None] = ()) -> str:
    """``value`` without the pattern matches and the matches of ``terms`` (the file's identifying
    values, the cohort's names), all found in the original text, so that no removal hides another
    match (a title eaten by a name, an address cut by an ID rule); then tidied."""
    spans = pattern_spans(value)
    for term in terms:
        if term is not None:
            spans += [m.span() for m in term.finditer(value)]
    out, pos = [], 0
    for start, end in sorted(spans):
        if start > pos:
            out.append(value[pos:start])
        pos = max(pos, end)
    out.append(value[pos:])
    return tidy(" ".join(out))


def name_components(values: Iterable[str]) -> set[str]:
    """Lower-case components of person names: PN values split at ``^``/``=``/spaces/commas.

    Components of one letter and name particles are left out (they identify nobody).
    """
    out: set[str] = set()
    for value in values:
        for part in re.split(r"[\^=\s,]+", value):
            part = part.strip(".'\"\x00").lower()
            if len(part) >= 2 and part not in PARTICLES and any(c.isalpha() for c in part):
                out.add(part)
    return out


def pn_tokens(value: str) -> list[str]:
    """PN-formatted tokens (``DOE^JANE``) inside any string."""
    return [m.group() for m in PATTERNS["person name (PN format)"].finditer(value)]


def tidy(value: str) -> str:
    """Collapse the gaps scrubbing leaves; strip separators left at the ends."""
    return SPACES.sub(" ", REPEATED_SEPARATORS.sub(r"\1", value)).strip(" ,;:-/")
