"""De-identify one DICOM dataset to PS3.15 Annex E (Basic Profile + the options in params).

:class:`Deidentifier` walks the dataset once, at every depth, and looks each tag up in the
compiled table (:mod:`ctpipe.deid.table`). Elements it keeps stay undecoded raw bytes; elements it
changes get new raw bytes (:mod:`ctpipe.deid.write`), so no value is decoded by pydicom. Actions:

- X remove; Z empty (Patient's Name and ID get the keyed pseudonym instead); D dummy value of the
  VR (UIDs: the keyed UID); U keyed UID (:meth:`ctpipe.deid.keys.Keyring.uid`) for every value;
- K keep; C clean: dates and date-times shifted by the patient's keyed offset (times kept, since
  the offset is whole days), free text (only the allow-listed descriptors get C, see
  :mod:`ctpipe.deid.freetext`) stripped of every identifying value found in the file (names and
  their components, IDs, addresses...), of the patterns of :data:`freetext.PATTERNS` and of every
  component of every person name seen in the cohort;
- sequences: X removes them, Z empties them, any other action keeps the items and walks them with
  the table (so every UID inside a reference sequence is replaced consistently).

Beyond the table, for safety: private elements are removed (unless on the Safe Private allow-list
with that option), group lengths and public elements unknown to pydicom are removed, dates not
named in the table are shifted (or removed without the dates option), and UIDs not named in the
table are replaced unless they are standard UIDs or class / transfer syntax UIDs. File meta is
rebuilt (MediaStorageSOPInstanceUID = new SOPInstanceUID) and the PS3.15 stamps are added.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from pydicom import __version__ as pydicom_version
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID_dictionary
from pydicom.valuerep import VR

from ctpipe.deid import freetext
from ctpipe.deid.dates import shift_date_cached
from ctpipe.deid.keys import Keyring
from ctpipe.deid.table import DeidOptions, Profile, safe_private
from ctpipe.deid.verify import Evidence, element_strings, known_public, norm, raw_vr
from ctpipe.deid.write import Encoder, encode_file, set_number, set_raw, set_text, text, text_of

PATIENT_NAME, PATIENT_ID = 0x00100010, 0x00100020
BINARY_VRS = frozenset(
    {"OB", "OW", "OD", "OF", "OL", "OV", "UN", "OB or OW", "US or OW", "US or SS or OW"}
)
WEAK_VRS = frozenset({"LT", "ST", "UT", "CS"}) | BINARY_VRS  # free text, codes, bytes
NUMBER_VRS = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "SV", "UV", "US or SS", "AT"})
DUMMY = {
    "DA": "19000101",
    "DT": "19000101000000",
    "TM": "000000",
    "AS": "000Y",
    "DS": "0",
    "IS": "0",
    "PN": "ANONYMIZED",
    "UR": "",
}
DUMMY_TEXT = "ANONYMIZED"
KEEP_UID_SUFFIXES = ("ClassUID", "SyntaxUID", "SchemeUID")
VALID_VRS = frozenset(v.value for v in VR)
CID7050 = {c.value: c.meaning for c in (getattr(codes.cid7050, n) for n in codes.cid7050.dir())}
IMPLEMENTATION = (PYDICOM_IMPLEMENTATION_UID, f"PYDICOM {pydicom_version}"[:16])
PN_PARTS = re.compile(r"[\^=]+")


class BadVR(ValueError):
    """An element whose Value Representation is not a DICOM VR."""


@dataclass
class FileDeid:
    """What was done to one file: counts per action, tags acted on, and the leak evidence."""

    counts: Counter = field(default_factory=Counter)
    applied: set[str] = field(default_factory=set)
    evidence: Evidence = field(default_factory=Evidence)
    patient_key: str = ""
    clean_terms: set[str] = field(default_factory=set)
    deferred: list[tuple[Dataset, int, str]] = field(default_factory=list)
    # Words and pairs of consecutive words of the scrubbed values, and the words the file's own
    # terms removed wherever they occur (freetext.Terms.may_change: could names found in other
    # files change them).
    words: set[str] = field(default_factory=set)
    pairs: set[tuple[str, str]] = field(default_factory=set)
    removed: frozenset[str] = frozenset()
    offset: dt.timedelta | None = None
    enc: tuple[bool, bool] = (False, True)  # the file's (is_implicit_VR, is_little_endian)
    top: dict[int, str] = field(default_factory=dict)
    nested: dict[int, str] = field(default_factory=dict)


class Deidentifier:
    """Applies the compiled profile to datasets; one instance per worker process."""

    def __init__(
        self,
        options: DeidOptions,
        keyring: Keyring,
        date_shift_days: tuple[int, int] = (-3650, -365),
        cohort_names: Iterable[str] = (),
    ) -> None:
        """``cohort_names``: components of every person name in the cohort (scrubbed from every
        kept descriptor, whoever's file it is; :func:`freetext.name_components`)."""
        self.options = options
        self.cohort = freetext.Terms(cohort_names)
        self.profile = Profile(options)
        self.keyring = keyring
        self.date_shift_days = (int(date_shift_days[0]), int(date_shift_days[1]))
        safe = safe_private() if options.retain_safe_private else frozenset()
        self.safe = frozenset((g, c.upper(), e) for g, c, e in safe)
        self._stamps: dict[tuple[bool, bool], bytes] = {}
        # Per-patient caches: a patient's files repeat most values (one worker sees them in a row).
        self._patient: str = ""
        self._kept_seen: set = set()
        self._collected: dict = {}
        self._cleaned: dict = {}
        self._terms: dict[frozenset[str], freetext.Terms] = {}

    def deidentify(self, ds: Dataset) -> FileDeid:
        """De-identify ``ds`` (a FileDataset) in place; return what was done."""
        state = FileDeid(patient_key=self.patient_key(ds))
        if state.patient_key != self._patient:
            self.reset_caches(state.patient_key)
        implicit, little = ds.original_encoding
        state.enc = (bool(implicit), little is not False)
        sop_class = text_of(ds, 0x00080016)
        state.top = self.profile.actions(sop_class, nested=False)
        state.nested = self.profile.actions(sop_class, nested=True)
        if self.options.retain_modified_dates:
            state.offset = self.keyring.date_offset(state.patient_key, *self.date_shift_days)
        self._walk(ds, state, 0)
        self._clean_deferred(state)
        self._stamp(ds, state)
        for tag, elem in ds.file_meta._dict.items():  # rebuilt on encoding: record what goes
            if tag not in (0x00020000, 0x00020001, 0x00020002, 0x00020010, 0x00020012, 0x00020013):
                self._collect(ds.file_meta, tag, elem, raw_vr(elem, tag), state)
                state.counts["meta_replaced"] += 1
                state.applied.add(f"{tag:08X}={'U' if tag == 0x00020003 else 'X'}")
        return state

    def reset_caches(self, patient_key: str = "") -> None:
        """Forget the per-patient caches (values already reported as kept, parsed evidence)."""
        self._patient = patient_key
        self._kept_seen, self._collected, self._cleaned, self._terms = set(), {}, {}, {}

    def encode(self, ds: Dataset) -> bytes:
        """The de-identified file's bytes: zero preamble, new meta, dataset in its syntax."""
        sop_class = text_of(ds, 0x00080016) or text_of(ds.file_meta, 0x00020002)
        syntax = text_of(ds.file_meta, 0x00020010)
        return encode_file(ds, sop_class, text_of(ds, 0x00080018), syntax, IMPLEMENTATION)

    def patient_key(self, ds: Dataset) -> str:
        """What identifies the patient: Patient ID, else name + birth date, else the study."""
        pid = text_of(ds, PATIENT_ID)
        if pid:
            return "id:" + pid
        name = text_of(ds, PATIENT_NAME)
        if name:
            return f"name:{name}|{text_of(ds, 0x00100030)}"
        return "study:" + text_of(ds, 0x0020000D)

    # -- the walk ----------------------------------------------------------------------------
    def _walk(self, ds: Dataset, st: FileDeid, depth: int) -> None:
        table = st.nested if depth else st.top
        creators: list[int] = []
        kept_blocks: set[tuple[int, int]] = set()
        kept = st.evidence.kept
        seen = self._kept_seen
        for tag, elem in list(ds._dict.items()):
            tag = int(tag)  # plain ints compare in C; pydicom's BaseTag compares in Python
            if elem.VR and elem.VR not in VALID_VRS:
                raise BadVR(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) has VR {elem.VR!r}")
            if tag >> 16 & 1:
                self._private(ds, tag, elem, st, depth, creators, kept_blocks)
                continue
            action = table.get(tag) or self._unlisted(tag, elem, st)
            vr = raw_vr(elem, tag)
            if action == "K":
                if vr == "SQ":
                    self._walk_items(ds, tag, st, depth)
                elif elem.value:
                    key = (tag, elem.value) if isinstance(elem.value, bytes) else None
                    if key is None or key not in seen:
                        if key:
                            seen.add(key)
                        kept.update(element_strings(elem, tag))
                continue
            st.counts[action] += 1
            st.applied.add(f"{tag:08X}={action}")
            self._apply(ds, tag, elem, vr, action, st, depth)
        for tag in creators:  # a private creator stays only while it owns a kept element
            if (tag >> 16, tag & 0xFF) not in kept_blocks:
                del ds._dict[tag]

    def _walk_items(self, ds: Dataset, tag: int, st: FileDeid, depth: int) -> None:
        for item in ds[tag].value or []:
            self._walk(item, st, depth + 1)

    def _unlisted(self, tag: int, elem, st: FileDeid) -> str:
        """Action for a public tag that Table E.1-1 does not name (see the module docstring)."""
        masked = self.profile.masked_action(tag)
        if masked:
            return masked
        if tag & 0xFFFF == 0 or tag >> 16 == 0x0002 or not known_public(tag):
            return "X"
        vr = raw_vr(elem, tag)
        if vr in ("DA", "DT"):
            return "C" if st.offset is not None else "X"
        if vr == "UI" and elem.value:
            if keyword_for_tag(tag).endswith(KEEP_UID_SUFFIXES):
                return "K"
            values = element_strings(elem, tag)
            return "K" if values and all(v in UID_dictionary for v in values) else "U"
        return "K"

    def _private(
        self,
        ds: Dataset,
        tag: int,
        elem,
        st: FileDeid,
        depth: int,
        creators: list[int],
        kept_blocks: set[tuple[int, int]],
    ) -> None:
        element = tag & 0xFFFF
        if 0x10 <= element <= 0xFF:
            creators.append(tag)
            return
        if element >= 0x1000 and self.safe:
            creator = ds._dict.get((tag & 0xFFFF0000) | (element >> 8))
            name = text(creator, ds).strip().upper() if creator is not None else ""
            if (tag >> 16, name, element & 0xFF) in self.safe:
                kept_blocks.add((tag >> 16, element >> 8))
                st.counts["private_kept"] += 1
                if raw_vr(elem, tag) == "SQ":
                    self._walk_items(ds, tag, st, depth)
                else:
                    st.evidence.kept.update(element_strings(elem, tag))
                return
        self._collect(ds, tag, elem, raw_vr(elem, tag), st, weak=True)
        st.counts["private_removed"] += 1
        del ds._dict[tag]

    # -- actions -----------------------------------------------------------------------------
    def _apply(
        self, ds: Dataset, tag: int, elem, vr: str, action: str, st: FileDeid, depth: int
    ) -> None:
        if vr == "SQ":
            if action in ("X", "Z"):
                self._collect(ds, tag, elem, vr, st)
                if action == "X":
                    del ds._dict[tag]
                else:
                    ds[tag].value = Sequence()
            else:
                self._walk_items(ds, tag, st, depth)
        elif action == "C":
            self._clean(ds, tag, elem, vr, st)
        else:
            self._collect(ds, tag, elem, vr, st)
            if action == "X":
                del ds._dict[tag]
            elif tag in (PATIENT_NAME, PATIENT_ID) and action in ("Z", "D"):
                pseudo = (
                    self.keyring.patient_name if tag == PATIENT_NAME else self.keyring.patient_id
                )
                set_text(ds, tag, vr, pseudo(st.patient_key), st.enc)
            elif action == "Z" or vr in BINARY_VRS:
                set_raw(ds, tag, vr, b"", st.enc)
            elif vr == "UI":  # U, and D on a UID: the keyed UID keeps references consistent
                self._replace_uids(ds, tag, elem, st)
            elif vr in NUMBER_VRS:
                set_number(ds, tag, vr, st.enc)
            else:
                set_text(ds, tag, vr, DUMMY.get(vr, DUMMY_TEXT), st.enc)

    def _replace_uids(self, ds: Dataset, tag: int, elem, st: FileDeid) -> None:
        values = [v.strip("\x00 ") for v in text(elem, ds).split("\\")]
        new = "\\".join(self.keyring.uid(v) if v else "" for v in values)
        set_raw(ds, tag, "UI", new.encode("ascii"), st.enc)

    def _clean(self, ds: Dataset, tag: int, elem, vr: str, st: FileDeid) -> None:
        if vr in ("DA", "DT") and st.offset is not None:
            self._collect(ds, tag, elem, vr, st)
            shifted = [shift_date_cached(v, st.offset) for v in text(elem, ds).split("\\")]
            set_raw(ds, tag, vr, "\\".join(shifted).encode("ascii"), st.enc)
            st.evidence.produced.update(norm(v) for v in shifted if v)
            st.evidence.produced.update(norm(v[:8]) for v in shifted if len(v) > 8)
        elif vr in ("TM", "DA", "DT", "AS") or vr in NUMBER_VRS or vr in BINARY_VRS:
            if elem.value:  # whole-day shift: times stay; numbers and binary have no text
                st.evidence.kept.update(element_strings(elem, tag))
        elif vr == "UI":
            self._collect(ds, tag, elem, vr, st)
            self._replace_uids(ds, tag, elem, st)
        elif vr == "PN":
            self._collect(ds, tag, elem, vr, st)
            set_text(ds, tag, vr, DUMMY["PN"], st.enc)
        else:  # free text: cleaned after the walk, once every identifying value is known
            st.deferred.append((ds, tag, vr))

    def _collect(
        self, ds: Dataset, tag: int, elem, vr: str, st: FileDeid, weak: bool = False
    ) -> None:
        """Record the values an element removes/replaces as leak evidence and clean terms."""
        if vr == "SQ":  # a removed/emptied sequence: the evidence of everything inside it
            key = (tag, elem.value, weak, "SQ") if isinstance(elem.value, bytes) else None
            found = self._collected.get(key) if key else None
            if found is None:
                inner = FileDeid(nested=st.nested)
                for item in ds[tag].value or []:
                    for sub_tag, sub in list(item._dict.items()):
                        sub_vr = raw_vr(sub, sub_tag)
                        action = "X" if sub_tag >> 16 & 1 else st.nested.get(sub_tag, "K")
                        if action != "K" or sub_vr == "SQ":
                            self._collect(
                                item, sub_tag, sub, sub_vr, inner, weak or bool(sub_tag >> 16 & 1)
                            )
                found = (inner.evidence.ident, inner.evidence.weak, inner.clean_terms)
                if key:  # the same raw sequence in the patient's next file: no parsing
                    self._collected[key] = found
            st.evidence.ident.update(found[0])
            st.evidence.weak.update(found[1])
            st.clean_terms.update(found[2])
            return
        if not elem.value or vr in NUMBER_VRS:
            return
        key = (tag, elem.value, weak) if isinstance(elem.value, bytes) else None
        found = self._collected.get(key) if key else None
        if found is None:
            found = self._evidence_of(ds, tag, elem, vr, weak)
            if key:
                self._collected[key] = found
        weak, values, terms = found
        (st.evidence.weak if weak else st.evidence.ident).update(values)
        st.clean_terms.update(terms)

    def _evidence_of(
        self, ds: Dataset, tag: int, elem, vr: str, weak: bool
    ) -> tuple[bool, list[str], list[str]]:
        """(weak?, normalised values, clean terms) of one element's value."""
        weak = weak or vr in WEAK_VRS or tag in self.profile.descriptive
        values = element_strings(elem, tag)
        if vr == "PN":
            values += [c for v in values for c in PN_PARTS.split(v) if c]
        terms: list[str] = []
        if weak or vr in ("UI", "DA", "DT", "TM"):  # dates, times, UIDs: freetext.PATTERNS
            return weak, values, terms
        for part in text(elem, ds).split("\\"):
            part = part.strip()
            if len(part) >= 3:
                terms.append(part)
            if vr == "PN":
                terms += [c for c in PN_PARTS.split(part) if len(c.strip()) > 1]
        return weak, values, terms

    def _clean_deferred(self, st: FileDeid) -> None:
        if not st.deferred:
            return
        key = frozenset(st.clean_terms)
        terms = self._terms.get(key)
        if terms is None:
            terms = self._terms[key] = freetext.Terms(key)
        for ds, tag, vr in st.deferred:
            elem = ds._dict[tag]
            cleaned = []
            whole = text(elem, ds)
            for value in whole.split("\\") if vr not in ("LT", "ST", "UT") else [whole]:
                if (key, value) not in self._cleaned:
                    words = freetext.words_of(value)
                    self._cleaned[key, value] = (
                        freetext.scrub(value, (terms, self.cohort)),
                        frozenset(words),
                        frozenset(zip(words, words[1:])),
                    )
                scrubbed, words, pairs = self._cleaned[key, value]
                cleaned.append(scrubbed)
                st.words |= words
                st.pairs |= pairs
            set_text(ds, tag, vr, "\\".join(cleaned), st.enc)
            st.evidence.cleaned.update(norm(v) for v in cleaned if v)
            st.counts["C"] += 1
            st.applied.add(f"{tag:08X}=C")
        st.removed = frozenset(st.words & terms.single)

    def _stamp(self, ds: Dataset, st: FileDeid) -> None:
        method_codes = self.options.codes()
        set_text(ds, 0x00120062, "CS", "YES", st.enc)  # PatientIdentityRemoved
        set_text(ds, 0x00120063, "LO", "\\".join(CID7050[c][:64] for c in method_codes), st.enc)
        if st.enc not in self._stamps:  # the same code items in every file: encode them once
            items = []
            for code in method_codes:
                item = Dataset()
                set_text(item, 0x00080100, "SH", code, st.enc)
                set_text(item, 0x00080102, "SH", "DCM", st.enc)
                set_text(item, 0x00080104, "LO", CID7050[code], st.enc)
                items.append(item)
            encoder = Encoder(*st.enc)
            sequence = DataElement(0x00120064, "SQ", Sequence(items))
            encoded = encoder.element(Dataset(), 0x00120064, sequence)
            self._stamps[st.enc] = encoded[8 if st.enc[0] else 12 : -8]  # items, no header/end
        set_raw(ds, 0x00120064, "SQ", self._stamps[st.enc], st.enc)
        set_text(ds, 0x00280303, "CS", "MODIFIED" if st.offset is not None else "REMOVED", st.enc)
