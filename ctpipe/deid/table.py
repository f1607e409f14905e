"""The PS3.15 Annex E Basic Profile table, compiled for one set of options.

The table is versioned data, not code: ``profile.csv`` (every attribute of Table E.1-1 with
the Basic Profile action and the action of each option), ``safe_private.csv`` (the Safe
Private Attributes of Table E.3.10-1) and ``profile.json`` (provenance, the CSV's SHA-256, and
the attribute types per IOD). ``scripts/make_deid_table.py`` generates all three from pinned
packages. Loading checks the CSV against the recorded hash, so an edited table is refused.

Compiling resolves, per IOD, every attribute to one action letter:

- Clean Descriptors applies only to the attributes of ``keep_descriptors``; the column's other
  free-text attributes keep their Basic Profile action (:mod:`ctpipe.deid.freetext`);
- an enabled option's code replaces the Basic Profile code (C wins over K when two options
  disagree, since cleaning keeps the value's use and drops identifiers);
- combined codes take the weaker action unless the attribute's type in the object's IOD needs the
  stronger (PS3.15 E.3.1): X/Z -> Z for Type 1/2, X/D -> D for Type 1/2, X/Z/D -> D for Type 1,
  Z for Type 2, Z/D -> D for Type 1; otherwise X (or Z). X/Z/U* (the reference sequences) -> U:
  the sequence is kept and every UID inside it replaced, so references keep resolving.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import resources

from ctpipe.deid.freetext import DEFAULT_KEEP_DESCRIPTORS

TABLE_CSV = "profile.csv"
SAFE_PRIVATE_CSV = "safe_private.csv"
TABLE_JSON = "profile.json"

# CID 7050 codes (PS3.16) for the profile and the options this stage offers.
BASIC_PROFILE_CODE = "113100"
OPTION_CODES = {
    "clean_descriptors": "113105",
    "retain_modified_dates": "113107",
    "retain_patient_characteristics": "113108",
    "retain_device_identity": "113109",
    "retain_safe_private": "113111",
}
# Our option names -> the table column that holds the option's actions.
OPTION_COLUMNS = {
    "clean_descriptors": "clean_descriptors",
    "retain_modified_dates": "rtn_modified_dates",
    "retain_patient_characteristics": "rtn_patient_characteristics",
    "retain_device_identity": "rtn_device_identity",
}
TYPE_RANK = {"1": 0, "1C": 0, "2": 1, "2C": 1}  # 0: value required, 1: present, may be empty


@dataclass(frozen=True)
class DeidOptions:
    """The PS3.15 options this stage offers (Table E.1-1 columns), all recorded in the output."""

    retain_modified_dates: bool = True
    retain_patient_characteristics: bool = True
    clean_descriptors: bool = True
    retain_device_identity: bool = False
    retain_safe_private: bool = False
    # Clean Descriptors keeps (scrubbed) only these; the column's other attributes are removed.
    keep_descriptors: tuple[str, ...] = field(default=DEFAULT_KEEP_DESCRIPTORS)

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep_descriptors", tuple(self.keep_descriptors))

    @classmethod
    def from_params(cls, params) -> DeidOptions:
        """The options of the ``anonymize`` section (:class:`ctpipe.config.Anonymize`)."""
        return cls(
            retain_modified_dates=params.retain_modified_dates,
            retain_patient_characteristics=params.retain_patient_characteristics,
            clean_descriptors=params.clean_descriptors,
            retain_device_identity=params.retain_device_identity,
            retain_safe_private=params.retain_safe_private,
            keep_descriptors=tuple(params.keep_descriptors),
        )

    def codes(self) -> list[str]:
        """CID 7050 codes of the Basic Profile and of every enabled option, in table order."""
        return [BASIC_PROFILE_CODE] + [c for k, c in OPTION_CODES.items() if getattr(self, k)]

    def as_dict(self) -> dict[str, bool | list[str]]:
        values = asdict(self)
        values["keep_descriptors"] = list(self.keep_descriptors)
        return values


def _read_text(name: str) -> str:
    return resources.files("ctpipe.deid").joinpath(name).read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def table_info() -> dict:
    """Provenance of the shipped table; raises if the CSV does not match its recorded hash."""
    meta = json.loads(_read_text(TABLE_JSON))
    digest = hashlib.sha256(_read_text(TABLE_CSV).encode("utf-8")).hexdigest()
    if digest != meta["deid_profile_csv_sha256"]:
        raise RuntimeError(
            f"ctpipe/deid/{TABLE_CSV} does not match the SHA-256 in {TABLE_JSON}: regenerate it with "
            "scripts/make_deid_table.py instead of editing it"
        )
    return meta


@lru_cache(maxsize=1)
def table_rows() -> list[dict[str, str]]:
    """Every row of Table E.1-1 as shipped (tag as 8 hex digits, 'X' for repeating nibbles)."""
    table_info()
    return list(csv.DictReader(io.StringIO(_read_text(TABLE_CSV))))


@lru_cache(maxsize=1)
def safe_private() -> frozenset[tuple[int, str, int]]:
    """Allow-list of the Retain Safe Private option: (group, creator, element low byte)."""
    rows = csv.DictReader(io.StringIO(_read_text(SAFE_PRIVATE_CSV)))
    return frozenset(
        (int(r["group"], 16), r["creator"].strip(), int(r["element"].replace("xx", ""), 16))
        for r in rows
    )


def _resolve(code: str, required: int | None) -> str:
    """One action letter for a (possibly combined) code, given the attribute's type rank."""
    if "/" not in code:
        return code
    parts = code.split("/")
    if "U*" in parts:
        return "U"
    if required == 0:  # Type 1: a value is required
        return "D" if "D" in parts else "Z"
    if required == 1:  # Type 2: the attribute must be present, may be empty
        return "Z" if "Z" in parts else "D"
    return parts[0]


class Profile:
    """Table E.1-1 compiled for one :class:`DeidOptions`: tag -> action letter, per IOD."""

    def __init__(self, options: DeidOptions) -> None:
        self.options = options
        self.codes: dict[int, str] = {}  # tag -> code after options, maybe combined
        self.masked: list[tuple[int, int, str]] = []  # (mask, value, code) for 50xx / 60xx rows
        self.descriptive: set[int] = set()  # free-text attributes (Clean Descriptors column)
        columns = [c for k, c in OPTION_COLUMNS.items() if getattr(options, k)]
        keep = set(options.keep_descriptors)
        for row in table_rows():
            code = row["basic"]
            removed_text = row["clean_descriptors"] and row["keyword"] not in keep
            overrides = {
                row[c]
                for c in columns
                if row[c] and not (c == "clean_descriptors" and removed_text)
            }
            if overrides:
                code = "C" if "C" in overrides else overrides.pop()
            if row["clean_descriptors"]:
                self.descriptive.add(int(row["tag"].replace("X", "0"), 16))
            if "X" in row["tag"]:
                mask = int("".join("0" if c == "X" else "F" for c in row["tag"]), 16)
                self.masked.append((mask, int(row["tag"].replace("X", "0"), 16), code))
            else:
                self.codes[int(row["tag"], 16)] = code
        column = {r["keyword"] for r in table_rows() if r["clean_descriptors"]}
        if keep - column:
            raise ValueError(
                f"keep_descriptors: {sorted(keep - column)} are not free-text attributes of the "
                "Clean Descriptors column of Table E.1-1"
            )
        meta = table_info()
        self.sop_iod: dict[str, str] = meta["sop_class_iod"]
        self.iod_types: dict[str, dict[str, dict[str, str]]] = meta["iod_types"]
        self._compiled: dict[tuple[str, bool], dict[int, str]] = {}

    def actions(self, sop_class_uid: str, nested: bool) -> dict[int, str]:
        """tag -> action letter for objects of this SOP class (top level or inside sequences).

        An unknown SOP class takes, per attribute, the strongest type found in any IOD.
        """
        iod = self.sop_iod.get(str(sop_class_uid), "*")
        key = (iod, nested)
        if key not in self._compiled:
            where = "nested" if nested else "top"
            if iod == "*":
                types: dict[str, int] = {}
                for entry in self.iod_types.values():
                    for tag, t in entry[where].items():
                        types[tag] = min(types.get(tag, 9), TYPE_RANK[t])
            else:
                types = {
                    t: TYPE_RANK[v] for t, v in self.iod_types.get(iod, {}).get(where, {}).items()
                }
            self._compiled[key] = {
                tag: _resolve(code, types.get(f"{tag:08X}")) for tag, code in self.codes.items()
            }
        return self._compiled[key]

    def masked_action(self, tag: int) -> str | None:
        """Action of a repeating-group row (curves 50xx, overlay data/comments 60xx), if any."""
        for mask, value, code in self.masked:
            if tag & mask == value:
                return _resolve(code, None)
        return None
