"""Person names in a header: what the cohort's list of names is made of (:mod:`.freetext`).

Read without changing the dataset, so that it is read once for both uses: the de-identifier
copies the elements pydicom has not decoded byte for byte, so an element is decoded here on the
side, and only when it can hold a name (a PN element, a sequence, a value with a ``^``).
"""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.charset import default_encoding
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset

from ctpipe.deid.freetext import name_components, pn_tokens
from ctpipe.deid.verify import raw_vr

PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
# VRs whose values decode to neither a person name nor items (UN: an unknown public element,
# bytes): without a '^', no name. An ambiguous VR with a '^' in its bytes is read as bytes, where
# pydicom's reading might have made numbers of them (a name more, never one less).
NO_NAME_VRS = frozenset(
    "AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW SH SL SS ST SV TM UC UI UL UN UR US UT"
    " UV".split()
    + ["US or SS", "US or OW", "US or SS or OW", "OB or OW"]
)
# Names by raw element, and components by names: a patient's files repeat their name elements
# and sequences byte for byte.
_SEEN: dict[tuple, list[str]] = {}
_COMPONENTS: dict[tuple[str, ...], frozenset[str]] = {}
MAX_SEEN = 4096


def name_parts(ds: Dataset) -> frozenset[str]:
    """Components of the person names in ``ds`` (:func:`person_names`, :func:`name_components`)."""
    names = tuple(person_names(ds))
    parts = _COMPONENTS.get(names)
    if parts is None:
        if len(_COMPONENTS) >= MAX_SEEN:
            _COMPONENTS.clear()
        parts = _COMPONENTS[names] = frozenset(name_components(names))
    return parts


def person_names(ds: Dataset, top: bool = True) -> list[str]:
    """Person names in ``ds`` at every depth: PN values, and PN-formatted tokens anywhere (a
    vendor's private ``DOE^JANE``); at the top level, the elements before the pixel data. Values
    that do not decode are skipped."""
    out: list[str] = []
    for tag, elem in ds._dict.items():
        if top and tag in PIXEL_TAGS:
            break
        if not isinstance(elem, RawDataElement):
            out += _element_names(elem)
        elif not _no_name(elem, tag):
            encoding = default_encoding
            if tag != 0x00080005:
                encoding = ds.original_character_set or ds._character_set
            # A private element without a VR takes it from its private creator: not cached.
            key = None
            if elem.VR not in (None, "UN") or not tag >> 16 & 1:
                key = (tag, elem.VR, elem.is_implicit_VR, elem.is_little_endian, elem.value)
                key += (str(encoding),)
            names = _SEEN.get(key) if key else None
            if names is None:
                try:
                    names = _element_names(convert_raw_data_element(elem, encoding=encoding, ds=ds))
                except Exception:  # noqa: BLE001 - a value pydicom cannot convert names nobody
                    names = []
                if key:
                    if len(_SEEN) >= MAX_SEEN:
                        _SEEN.clear()
                    _SEEN[key] = names
            out += names
    return out


def _element_names(elem) -> list[str]:
    value = elem.value
    if elem.VR == "SQ":
        return [name for item in value or [] for name in person_names(item, top=False)]
    if isinstance(value, bytes):
        return pn_tokens(value.decode("latin-1"))
    if elem.VR == "PN":
        return [str(v) for v in (value if elem.VM > 1 else [value]) if v]
    if isinstance(value, str) and "^" in value:
        return pn_tokens(value)
    return []


def _no_name(raw: RawDataElement, tag: int) -> bool:
    """Whether a raw element certainly holds no name (without decoding it)."""
    if not raw.value:
        return True
    if b"^" in raw.value:
        return False
    if raw.VR in (None, "UN") and tag >> 16 & 1:  # pydicom may know it from the private creator
        return False
    return raw_vr(raw, tag) in NO_NAME_VRS


def names_of_file(path: Path) -> set[str]:
    """Name components in one file's header, read with pydicom's forgiving reader (none if it
    does not read as DICOM): for files the de-identification pass cannot read."""
    try:
        ds = dcmread(path, stop_before_pixels=True, force=True)
    except Exception:  # noqa: BLE001 - the de-identification pass quarantines it with a reason
        return set()
    return set(name_parts(ds))
