"""LIDC-IDRI's readers' malignancy ratings onto a LUNA16-style ``annotations.csv``.

LUNA16's ``annotations.csv`` has no malignancy; LIDC-IDRI's XML files (one per CT series, TCIA)
have each reader's session: every nodule of 3 mm or more that the reader marked, its outline on
each slice (``roi``: ``imageSOP_UID``, ``edgeMap`` points in pixel columns ``xCoord`` and rows
``yCoord``) and its characteristics, among them ``malignancy`` (1-5). Usage::

    python -m ctpipe.lidc XML_DIR DICOM_DIR ANNOTATIONS OUT_CSV

reads every ``*.xml`` under ``XML_DIR`` and the headers of the DICOM files under ``DICOM_DIR`` (to
place the outlines in world mm), and writes ``ANNOTATIONS`` with ``malignancy_1`` ..
``malignancy_4`` to ``OUT_CSV``: reader ``r`` (the ``r``-th reading session of the series' file) rates
a row when the centre of one of its nodules (the mean of the outline's points) lies within the
row's radius (at least :data:`MIN_RADIUS_MM`) of the row's centre; the nearest if several do. A row
no reader rated keeps empty ratings, which the malignancy stage leaves out, and the counts are
logged: files that cannot be read (named, with the reason), sessions beyond the fourth, ratings
that are not 1-5, reader nodules that match no row, slices the DICOM folder does not hold.

Python's XML parser (expat 2.4.1 or later) expands no external entity and refuses entity bombs;
:func:`read_sessions` checks that version.
"""

from __future__ import annotations

import argparse
import logging
import pyexpat
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom

from ctpipe import annotations
from ctpipe.fileio import write_csv
from ctpipe.listing import list_files
from ctpipe.progress import progress

log = logging.getLogger("ctpipe.lidc")
NS = {"l": "http://www.nih.gov"}
MIN_RADIUS_MM = 3.0  # a reader's centre matches a row this close even when the row is smaller
READERS = len(annotations.RATINGS)
MIN_EXPAT = (2, 4, 1)  # the first expat that refuses entity bombs (billion laughs)


class LidcError(ValueError):
    """An XML file that is not an LIDC read message: the message names the file and the reason."""


def read_sessions(path: Path) -> tuple[str, list[list[dict]]]:
    """The series UID of an LIDC XML file and, per reading session, its nodules that carry a
    malignancy rating: ``{"rating": int | None, "points": [(sop_uid, x, y), ...]}``.

    Raises:
        LidcError: not XML, not an LIDC read message, no series UID; or an expat that would
            expand entity bombs.
    """
    if pyexpat.version_info < MIN_EXPAT:
        raise LidcError(f"expat {pyexpat.EXPAT_VERSION} expands entity bombs: refusing {path}")
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as err:
        raise LidcError(f"{path}: not readable XML ({err})") from None
    if root.tag != "{http://www.nih.gov}LidcReadMessage":
        raise LidcError(f"{path}: not an LIDC read message (root {root.tag[:80]!r})")
    series = (root.findtext("l:ResponseHeader/l:SeriesInstanceUid", "", NS) or "").strip()
    if not series:
        raise LidcError(f"{path}: no ResponseHeader/SeriesInstanceUid")
    sessions = []
    for session in root.findall("l:readingSession", NS):
        nodules = []
        for nodule in session.findall("l:unblindedReadNodule", NS):
            text = nodule.findtext("l:characteristics/l:malignancy", None, NS)
            if text is None:  # under 3 mm: a centre, no characteristics
                continue
            points = []
            for roi in nodule.findall("l:roi", NS):
                if (roi.findtext("l:inclusion", "TRUE", NS) or "").strip().upper() != "TRUE":
                    continue
                sop = (roi.findtext("l:imageSOP_UID", "", NS) or "").strip()
                for edge in roi.findall("l:edgeMap", NS):
                    points.append((sop, _number(edge, "xCoord"), _number(edge, "yCoord")))
            nodules.append({"rating": _rating(text), "points": points})
        sessions.append(nodules)
    return series, sessions


def _number(edge: ET.Element, name: str) -> float:
    try:
        return float(edge.findtext(f"l:{name}", "nan", NS))
    except ValueError:
        return float("nan")


def _rating(text: str) -> int | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value in (1, 2, 3, 4, 5) else None


def slice_geometry(dicom_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per SOP Instance UID: ImagePositionPatient, and the world step of one pixel column and of
    one pixel row (mm), from the headers of the files under ``dicom_dir`` (unreadable ones and
    those without the attributes are skipped, counted in the log)."""
    paths, _ = list_files(dicom_dir)
    out, skipped = {}, 0
    for path in progress(paths, desc="DICOM headers", unit="file"):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            position = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
            orientation = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
            rows_mm, cols_mm = (float(v) for v in ds.PixelSpacing)
            sop = str(ds.SOPInstanceUID)
        except Exception:  # noqa: BLE001 - any file that is not a usable CT slice is skipped
            skipped += 1
            continue
        out[sop] = (position, orientation[:3] * cols_mm, orientation[3:] * rows_mm)
    if skipped:
        log.info("%s: %d files without a usable slice geometry skipped", dicom_dir, skipped)
    return out


def reader_centres(
    sessions: list[list[dict]], slices: dict, counts: Counter
) -> list[tuple[int, int, np.ndarray]]:
    """(reader, rating, centre xyz) of every rated nodule whose outline lies on known slices."""
    out = []
    for reader, nodules in enumerate(sessions):
        if reader >= READERS:
            counts["sessions_beyond_4"] += 1
            continue
        for nodule in nodules:
            if nodule["rating"] is None:
                counts["ratings_not_1_to_5"] += 1
                continue
            world = []
            for sop, x, y in nodule["points"]:
                if sop not in slices or not np.isfinite([x, y]).all():
                    counts["points_off_known_slices"] += 1
                    continue
                position, column_step, row_step = slices[sop]
                world.append(position + x * column_step + y * row_step)
            if world:
                out.append((reader, nodule["rating"], np.mean(world, axis=0)))
            else:
                counts["nodules_without_a_placed_outline"] += 1
    return out


def add_ratings(frame: pd.DataFrame, series: str, centres: list, counts: Counter) -> None:
    """Write the readers' ratings into ``frame``'s rows of ``series`` (in place)."""
    rows = frame.index[frame["seriesuid"].astype(str) == series]
    if not len(rows):
        counts["reader_nodules_of_series_not_annotated"] += len(centres)
        return
    xyz = frame.loc[rows, ["coordX", "coordY", "coordZ"]].to_numpy(np.float64)
    reach = np.maximum(frame.loc[rows, "diameter_mm"].to_numpy(np.float64) / 2, MIN_RADIUS_MM)
    best: dict[tuple[int, int], tuple[float, int]] = {}
    for reader, rating, centre in centres:
        dist = np.linalg.norm(xyz - centre, axis=1)
        inside = np.flatnonzero(dist <= reach)
        if not len(inside):
            counts["reader_nodules_matching_no_row"] += 1
            continue
        i = int(inside[np.argmin(dist[inside])])
        key = (int(rows[i]), reader)
        if key not in best or dist[i] < best[key][0]:
            best[key] = (float(dist[i]), rating)
    for (row, reader), (_, rating) in best.items():
        frame.loc[row, annotations.RATINGS[reader]] = rating


def rate_annotations(
    xml_dir: Path, dicom_dir: Path, frame: pd.DataFrame
) -> tuple[pd.DataFrame, Counter]:
    """``frame`` (a LUNA16-style annotations table) with the readers' ratings of the XML files
    under ``xml_dir``; and the counts of what was left out."""
    frame = frame.copy()
    for column in annotations.RATINGS:
        frame[column] = pd.array([pd.NA] * len(frame), dtype="Int64")
    slices = slice_geometry(dicom_dir)
    counts: Counter = Counter()
    paths, entries = list_files(xml_dir)
    for entry in entries:
        log.warning("%s: not read: %s", entry["path"], entry["reason"])
        counts["entries_not_read"] += 1
    for path in (p for p in paths if p.suffix.lower() == ".xml"):
        try:
            series, sessions = read_sessions(path)
        except LidcError as err:
            log.warning("%s", err)
            counts["xml_files_not_read"] += 1
            continue
        counts["xml_files"] += 1
        add_ratings(frame, series, reader_centres(sessions, slices, counts), counts)
    counts["rows_rated"] = int(frame[annotations.RATINGS].notna().any(axis=1).sum())
    counts["rows"] = len(frame)
    return frame, counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ctpipe.lidc",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("xml_dir", type=Path, help="LIDC-IDRI's XML files (searched recursively)")
    parser.add_argument("dicom_dir", type=Path, help="the DICOM series the XML files describe")
    parser.add_argument("annotations", type=Path, help="LUNA16-style annotations.csv")
    parser.add_argument("out", type=Path, help="the annotations with malignancy_1 .. malignancy_4")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        frame = annotations.select(
            pd.read_csv(args.annotations, dtype={"seriesuid": str}), str(args.annotations)
        )
    except (OSError, ValueError, UnicodeDecodeError) as err:
        log.error("%s", err)
        return 2
    rated, counts = rate_annotations(args.xml_dir, args.dicom_dir, frame)
    write_csv(args.out, rated)
    log.info("%s: %s", args.out, dict(sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
