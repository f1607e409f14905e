"""Dates shifted by a patient's whole-day offset (Retain Longitudinal Temporal Information with
Modified Dates): DA values and the date part of DT values, intervals between them kept."""

from __future__ import annotations

import datetime as dt
from functools import lru_cache


def shift_date(value: str, offset: dt.timedelta) -> str:
    """Shift a DA (or the date part of a DT) by whole days; '' if it is not a valid date."""
    value = value.strip()
    digits = value.replace(".", "") if len(value) == 10 else value  # ACR-NEMA YYYY.MM.DD
    head, tail = digits[:8], digits[8:]
    try:
        if len(head) == 8:
            return (dt.datetime.strptime(head, "%Y%m%d") + offset).strftime("%Y%m%d") + tail
        if len(head) in (4, 6):  # DT of year or month precision: shift from its middle
            mid = dt.datetime.strptime(head + ("0701" if len(head) == 4 else "15"), "%Y%m%d")
            return (mid + offset).strftime("%Y%m%d")[: len(head)]
    except ValueError:
        pass
    return ""


@lru_cache(maxsize=4096)
def shift_date_cached(value: str, offset: dt.timedelta) -> str:
    return shift_date(value, offset)
