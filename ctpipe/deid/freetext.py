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

Time linear in the text: one hostile value (a 1 MB comment without a separator) must not stall
a cohort. A pattern that could scan a long run again from every position of it is tried only
where a match can start, and a failed try skips the positions that reach the same end
(:class:`Rule`); identifying values and names are matched token by token (:class:`Terms`), not
as one alternation of every term tried at every position.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from itertools import accumulate, compress
from typing import NamedTuple

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
NOT_PN = r"\s\\,;:()\[\]"  # what ends a PN-formatted token
PN = rf"[^{NOT_PN}]*\^[^{NOT_PN}]*"
EMAIL = r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"


class Rule(NamedTuple):
    """A pattern whose :meth:`finditer` gives the matches of ``pattern.finditer``, in linear time.

    ``re.finditer`` tries every position; where a try scans a long run (a token without ``@``
    for the e-mail pattern) and fails at its end, the next position scans the run again. Here
    ``pattern`` is tried where the last match ended, and ``start`` finds the next position a match
    can start at: the pattern itself, tried only where a run begins (a later position of a run
    would reach the same end and fail the same way), or, with ``skip``, a cheap test of a
    possible start; after a failed try there, ``skip`` covers the positions that fail the same way.
    """

    pattern: re.Pattern
    start: re.Pattern | None = None
    skip: re.Pattern | None = None

    def finditer(self, value: str) -> Iterator[re.Match]:
        if self.start is None:
            yield from self.pattern.finditer(value)
            return
        pos = 0
        while pos < len(value):  # no pattern matches the empty string
            match = self.pattern.match(value, pos)
            if match is None:
                found = self.start.search(value, pos + 1)
                if found is None:
                    return
                if self.skip is not None:
                    match = self.pattern.match(value, found.start())
                    if match is None:
                        run = self.skip.match(value, found.start())
                        pos = max(found.start() + 1, run.end() if run is not None else 0)
                        continue
                else:
                    match = found
            yield match
            pos = match.end()


# name -> rule; applied in this order (a titled name before the generic identifier rule).
PATTERNS: dict[str, Rule] = {
    "e-mail address": Rule(re.compile(EMAIL), re.compile(rf"(?<![\w.+-]){EMAIL}")),
    "person name (PN format)": Rule(re.compile(PN), re.compile(rf"(?<![^{NOT_PN}]){PN}")),
    "titled name": Rule(
        re.compile(rf"(?<![^\W_]){TITLES}\b\.?(?:\s+[A-Z][\w'\u2019-]*\.?){{1,3}}")
    ),
    "date": Rule(
        re.compile(
            r"(?<!\d)(?:(?:19|20)\d\d[-/.]?(?:0[1-9]|1[0-2])[-/.]?(?:0[1-9]|[12]\d|3[01])"
            r"|\d{1,2}[-/.]\d{1,2}[-/.](?:19|20)?\d\d)(?!\d)"
            rf"|\b\d{{1,2}}(?:st|nd|rd|th)?\s+{MONTHS}\s+(?:19|20)\d\d\b"
            rf"|\b{MONTHS}\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+(?:19|20)\d\d\b"
        )
    ),
    "UID": Rule(re.compile(r"(?<![\w.])\d+(?:\.\d+){3,}(?![\w.])")),
    "phone number": Rule(
        re.compile(r"(?<![\w.])\+?(?:\(?\d[\d ()./-]{5,}\d)(?![\w.])"),
        re.compile(r"(?<![\w.])[+(\d](?=[\d ()./-]{6})"),  # 6 more characters of a match
        re.compile(r"\+?\(?\d[\d ()./-]*"),
    ),
    # A whole token (letters and digits) holding 5 digits in a row, or '#' and a number. The
    # look-ahead finds the digits, so the token is scanned from its start only.
    "identifier": Rule(re.compile(r"#\s*\d+|(?<!\w)(?=[^\W_]*?\d{5})[^\W_]+(?!\w)")),
}
PHONE_DIGITS = 7  # a "phone number" match with fewer digits is a measurement ("1.25 / 5 mm")
# Name particles: identify nobody on their own and occur in ordinary text.
PARTICLES = frozenset(
    "al ap bin da das de del della der di dos du el la le van von y zu anonymized anonymous".split()
)
SPACES = re.compile(r"\s{2,}")
# From the start of a run of spaces only: tried inside the run, it would scan the run again.
REPEATED_SEPARATORS = re.compile(r"(?<!\s)\s*([,;:])(?:\s*[,;:])+")
WORD = re.compile(r"[^\W_]+")
WORD_SPLIT = re.compile(r"([^\W_]+)")
# Case-insensitive comparison: Unicode case folding, with the dotted and dotless i of Turkish
# folded to i as Python's re.IGNORECASE matches them.
_TURKISH_I = str.maketrans({"\u0130": "i", "\u0131": "i"})


def fold(word: str) -> str:
    """The form in which two spellings of a word compare equal whatever their case."""
    return word.lower() if word.isascii() else word.translate(_TURKISH_I).casefold()


def words_of(value: str) -> list[str]:
    """The folded runs of letters and digits of ``value``, in order."""
    if value.isascii():
        return WORD.findall(value.lower())
    return [fold(w) for w in WORD.findall(value)]


class Terms:
    """Terms (identifying values, name components) removed wherever their words occur in a row.

    A term matches as a whole-word sequence in any case: its runs of letters and digits, equal
    to consecutive runs of the text, with anything but letters and digits between them
    (``DOE^JANE`` matches ``Doe, Jane`` and not ``Jane Doe``). Every match of every term counts,
    overlapping ones too. The text's words are looked up by each term's first word, so the time
    is linear in the text whatever the number of terms.
    """

    def __init__(self, terms: Iterable[str] = ()) -> None:
        self.by_first: dict[str, set[tuple[str, ...]]] = {}
        for term in terms:
            words = tuple(fold(w) for w in WORD.findall(term))
            if words:
                self.by_first.setdefault(words[0], set()).add(words)
        # The one-word terms (removed wherever the word occurs); longer ones by their first pair.
        self.single = frozenset(w for w, terms in self.by_first.items() if (w,) in terms)
        self.longer: dict[tuple[str, str], list[tuple[str, ...]]] = {}
        for t in {t for ts in self.by_first.values() for t in ts if len(t) > 1}:
            self.longer.setdefault(t[:2], []).append(t)

    def __bool__(self) -> bool:
        return bool(self.by_first)

    def spans(self, value: str) -> list[tuple[int, int]]:
        """(start, end) of every match in ``value``."""
        words = words_of(value)
        if self.by_first.keys().isdisjoint(words):
            return []
        # value split into gap, word, gap, word, ..., gap: word i is part 2i + 1, and its start
        # and end are the summed lengths of the parts before it and up to it.
        edges = list(accumulate(map(len, WORD_SPLIT.split(value)), initial=0))
        starts, ends = edges[1::2], edges[2::2]
        # One-word terms: every occurrence of the word (selected in C, for texts of many words).
        single = [word in self.single for word in words]
        out = list(zip(compress(starts, single), compress(ends, single)))
        for first in self.longer.keys() & set(zip(words, words[1:])):
            for i in [i for i, pair in enumerate(zip(words, words[1:])) if pair == first]:
                for term in self.longer[first]:
                    if tuple(words[i : i + len(term)]) == term:
                        out.append((starts[i], ends[i + len(term) - 1]))
        return out

    def may_change(self, words: Iterable[str], removed: frozenset[str], pairs: set) -> bool:
        """Whether these terms could remove more from a text that :func:`scrub` already cleaned,
        given its words, those of them removed wherever they occur (by one-word terms), and its
        pairs of consecutive words: only through a one-word term that is one of its other
        words, or a longer term whose consecutive words are all pairs of the text."""
        if not self.single.isdisjoint(set(words) - removed):
            return True
        return any(
            all(p in pairs for p in zip(t[1:], t[2:]))
            for first in self.longer.keys() & pairs
            for t in self.longer[first]
        )


def _matches(value: str) -> Iterator[tuple[str, re.Match]]:
    """(pattern name, match) of every :data:`PATTERNS` match in ``value``; phone-like runs of
    fewer than :data:`PHONE_DIGITS` digits are measurements, not matches."""
    for name, rule in PATTERNS.items():
        for m in rule.finditer(value):
            if name != "phone number" or sum(c.isdigit() for c in m.group()) >= PHONE_DIGITS:
                yield name, m


def pattern_matches(value: str) -> list[tuple[str, str]]:
    """(pattern name, matched text) of every match in ``value`` (what the leak gate reports)."""
    return [(name, m.group().strip()) for name, m in _matches(value)]


def pattern_spans(value: str) -> list[tuple[int, int]]:
    """(start, end) of every match in ``value`` (what :func:`scrub` removes)."""
    return [m.span() for _, m in _matches(value)]


def scrub(value: str, terms: Iterable[Terms | re.Pattern | None] = ()) -> str:
    """``value`` without the pattern matches and the matches of ``terms`` (the file's identifying
    values, the cohort's names), all found in the original text, so that no removal hides another
    match (a title eaten by a name, an address cut by an ID rule); then tidied.

    The result depends only on which characters are removed (:meth:`Terms.may_change`)."""
    spans = pattern_spans(value)
    for term in terms:
        if isinstance(term, Terms):
            spans += term.spans(value)
        elif term is not None:
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
    if "^" not in value:
        return []
    return [m.group() for m in PATTERNS["person name (PN format)"].finditer(value)]


def tidy(value: str) -> str:
    """Collapse the gaps scrubbing leaves; strip separators left at the ends."""
    return SPACES.sub(" ", REPEATED_SEPARATORS.sub(r"\1", value)).strip(" ,;:-/")
