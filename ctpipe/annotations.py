"""The columns of ``annotations.csv``, one nodule per row, as ingest, anonymize and preprocess pass it.

Required (LUNA16): ``seriesuid, coordX, coordY, coordZ, diameter_mm`` (world mm, LPS). Optional,
each column may be absent and each cell empty (unknown):

- ``type``: where the nodule sits: ``isolated``, ``juxta_pleural`` (on the chest wall or the
  mediastinum), ``perifissural`` (on a fissure), ``juxta_vascular`` (touching a vessel);
- ``texture``: ``solid``, ``part_solid``, ``ground_glass``;
- ``margin``: ``smooth``, ``lobulated``, ``spiculated``;
- ``solid_fraction``: diameter of the solid part over the nodule's (1 solid, 0 pure ground glass);
- ``malignancy_1`` .. ``malignancy_4``: each reader's malignancy rating, an integer from 1 (highly
  unlikely) to 5 (highly suspicious), as LIDC-IDRI's readers rate (empty: that reader did not).

The synthetic cohort writes all of them; a LUNA16 or user CSV may have none. A category is a short
snake_case word (another vocabulary is kept as it is), so no free text travels with the nodules;
any other column is dropped.
"""

from __future__ import annotations

import re

import pandas as pd

REQUIRED = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
CATEGORIES = ["type", "texture", "margin"]
RATINGS = [f"malignancy_{r}" for r in range(1, 5)]  # ctpipe.malignancy reads them
OPTIONAL = [*CATEGORIES, "solid_fraction", *RATINGS]
COLUMNS = REQUIRED + OPTIONAL
WORD = re.compile(r"[a-z][a-z0-9_]{0,31}")


def select(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    """The required columns and the optional ones ``frame`` has, in :data:`COLUMNS` order.

    Raises:
        ValueError: naming ``source`` and the column: a required column is missing, a category
            is not a short snake_case word, or ``solid_fraction`` is not a number in [0, 1]. The
            row is named, not the value (a mistaken column could hold anything).
    """
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise ValueError(f"{source}: missing columns {missing}; expected {REQUIRED}")
    for column in CATEGORIES:
        if column not in frame.columns:
            continue
        values = frame[column]
        word = values.map(lambda v: isinstance(v, str) and WORD.fullmatch(v) is not None)
        bad = values.notna() & ~word.astype(bool)
        if bad.any():
            raise ValueError(
                f"{source}: column {column!r}, row {_row(bad)}: not a snake_case word "
                f"(a-z, 0-9, _; at most 32 characters) or empty"
            )
    if "solid_fraction" in frame.columns:
        number = pd.to_numeric(frame["solid_fraction"], errors="coerce")
        given = frame["solid_fraction"].notna()
        bad = given & ~number.between(0, 1)  # NaN (not a number) is not between
        if bad.any():
            raise ValueError(
                f"{source}: column 'solid_fraction', row {_row(bad)}: not a number in [0, 1]"
            )
        frame = frame.assign(solid_fraction=number)
    for column in [c for c in RATINGS if c in frame.columns]:
        number = pd.to_numeric(frame[column], errors="coerce")
        given = frame[column].notna()
        bad = given & ~(number.isin(range(1, 6)))
        if bad.any():
            raise ValueError(
                f"{source}: column {column!r}, row {_row(bad)}: not a rating 1, 2, 3, 4 or 5"
            )
        frame = frame.assign(**{column: number.astype("Int64")})
    return frame[[c for c in COLUMNS if c in frame.columns]]


def _row(bad: pd.Series) -> int:
    """The CSV row (header = row 1) of the first ``True`` of ``bad``."""
    return int(bad.to_numpy().argmax()) + 2
