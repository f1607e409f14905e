"""LIDC-IDRI XML ratings onto annotations.csv: the right rows, and hostile files reported."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pydicom
import pytest

from ctpipe import annotations, lidc, synth

HEAD = '<?xml version="1.0" encoding="UTF-8"?>\n'


def series_with_nodules(root):
    cohort = synth.Cohort(n_patients=1, matrix=48, z_extent_mm=80, max_nodules=3)
    cohort = cohort.but(fraction_without_nodules=0.0, diameter_mm=(8, 16))
    rows = synth.write_case(root / "dicom", 3, 0, cohort)
    frame = synth.annotations_frame(rows).drop(columns=annotations.RATINGS)
    return frame, sorted((root / "dicom").rglob("*.dcm"))


def outline(files, centre, radius_mm=3.0) -> list[tuple[str, float, float]]:
    """Points of a circle around ``centre`` on the slice nearest it, in pixel columns / rows."""
    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    ds = min(heads, key=lambda d: abs(float(d.ImagePositionPatient[2]) - centre[2]))
    orient = np.asarray(ds.ImageOrientationPatient, dtype=float)
    dy, dx = (float(v) for v in ds.PixelSpacing)
    steps = np.stack([orient[:3] * dx, orient[3:] * dy], axis=1)
    xy, *_ = np.linalg.lstsq(steps, np.asarray(centre) - np.asarray(ds.ImagePositionPatient, float))
    angles = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    return [
        (
            str(ds.SOPInstanceUID),
            xy[0] + radius_mm / dx * np.cos(a),
            xy[1] + radius_mm / dy * np.sin(a),
        )
        for a in angles
    ]


def nodule_xml(rating, points, extra="") -> str:
    edges = "".join(
        f"<edgeMap><xCoord>{x:.2f}</xCoord><yCoord>{y:.2f}</yCoord></edgeMap>" for _, x, y in points
    )
    sop = points[0][0] if points else ""
    return (
        f"<unblindedReadNodule><noduleID>n</noduleID><characteristics>{extra}"
        f"<malignancy>{rating}</malignancy></characteristics><roi><imageZposition>0"
        f"</imageZposition><imageSOP_UID>{sop}</imageSOP_UID><inclusion>TRUE</inclusion>"
        f"{edges}</roi></unblindedReadNodule>"
    )


def read_message(series: str, sessions: list[list[str]], prolog: str = "") -> str:
    body = "".join(
        "<readingSession><servicingRadiologistID>r</servicingRadiologistID>"
        + "".join(nodules)
        + "</readingSession>"
        for nodules in sessions
    )
    return (
        HEAD + prolog + '<LidcReadMessage xmlns="http://www.nih.gov"><ResponseHeader>'
        f"<SeriesInstanceUid>{series}</SeriesInstanceUid></ResponseHeader>{body}</LidcReadMessage>"
    )


def test_each_reader_rates_the_row_whose_nodule_he_outlined(tmp_path):
    frame, files = series_with_nodules(tmp_path)
    series = frame["seriesuid"].iloc[0]
    centres = frame[["coordX", "coordY", "coordZ"]].to_numpy()
    sessions = []
    for reader in range(4):  # reader r rates nodule i with 1 + (r + i) % 5; reader 4 skips row 0
        sessions.append(
            [
                nodule_xml(1 + (reader + i) % 5, outline(files, c))
                for i, c in enumerate(centres)
                if not (reader == 3 and i == 0)
            ]
        )
    (tmp_path / "xml").mkdir()
    (tmp_path / "xml" / "069.xml").write_text(read_message(series, sessions))
    rated, counts = lidc.rate_annotations(tmp_path / "xml", tmp_path / "dicom", frame)
    for i in range(len(frame)):
        for reader in range(4):
            value = rated.loc[i, annotations.RATINGS[reader]]
            assert (value is pd.NA) if (reader == 3 and i == 0) else value == 1 + (reader + i) % 5
    assert counts["rows_rated"] == len(frame) and counts["xml_files"] == 1
    annotations.select(rated, "rated.csv")  # what ingest will accept


def test_hostile_files_and_values_are_reported_and_the_rest_still_rated(tmp_path, caplog):
    frame, files = series_with_nodules(tmp_path)
    series = frame["seriesuid"].iloc[0]
    good = outline(files, frame[["coordX", "coordY", "coordZ"]].to_numpy()[0])
    xml = tmp_path / "xml"
    xml.mkdir()
    (xml / "rated.xml").write_text(read_message(series, [[nodule_xml(4, good)]]))
    (xml / "not_xml.xml").write_bytes(b"\x00\xff garbage <")
    (xml / "other_root.xml").write_text(HEAD + "<html><body/></html>")
    bomb = (
        '<!DOCTYPE r [<!ENTITY a "aaaaaaaaaa">'
        + "".join(f'<!ENTITY {c} "{("&" + p + ";") * 10}">' for p, c in zip("abcdefgh", "bcdefghi"))
        + "]>"
    )
    (xml / "bomb.xml").write_text(read_message(series, [[nodule_xml("&i;", good)]], bomb))
    external = '<!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
    (xml / "external.xml").write_text(read_message(series, [[nodule_xml("&x;", good)]], external))
    odd = [
        [nodule_xml(9, good), nodule_xml("x; DROP TABLE", good), nodule_xml(5, [("1.2.3", 1, 1)])]
    ] + [[]] * 4  # five sessions: the fifth is beyond the four rating columns
    (xml / "odd.xml").write_text(read_message(series, odd))
    (xml / "no_series.xml").write_text(read_message("", [[nodule_xml(3, good)]]))
    with caplog.at_level("WARNING"):
        rated, counts = lidc.rate_annotations(xml, tmp_path / "dicom", frame)
    assert rated.loc[0, "malignancy_1"] == 4  # rated.xml (sorted before the others' reader 1)
    assert counts["ratings_not_1_to_5"] == 2 and counts["sessions_beyond_4"] == 1
    assert counts["nodules_without_a_placed_outline"] == 1
    assert counts["xml_files_not_read"] >= 4  # garbage, other root, bomb, no series (+ external)
    for name in ("not_xml.xml", "other_root.xml", "bomb.xml", "no_series.xml"):
        assert name in caplog.text
    assert "root:" not in caplog.text and "/etc/passwd" not in rated.to_csv()


def test_the_command_writes_the_rated_csv(tmp_path):
    frame, files = series_with_nodules(tmp_path)
    series = frame["seriesuid"].iloc[0]
    centre = frame[["coordX", "coordY", "coordZ"]].to_numpy()[0]
    (tmp_path / "xml").mkdir()
    message = read_message(series, [[nodule_xml(2, outline(files, centre))]])
    (tmp_path / "xml" / "a.xml").write_text(message)
    frame.to_csv(tmp_path / "annotations.csv", index=False)
    argv = [str(tmp_path / p) for p in ("xml", "dicom", "annotations.csv", "out.csv")]
    assert lidc.main(argv) == 0
    out = annotations.select(pd.read_csv(tmp_path / "out.csv"), "out.csv")
    assert out.loc[0, "malignancy_1"] == 2 and out["malignancy_2"].isna().all()
    (tmp_path / "bad.csv").write_text("seriesuid,coordX\n1,2\n")
    assert lidc.main([argv[0], argv[1], str(tmp_path / "bad.csv"), argv[3]]) == 2


@pytest.mark.parametrize(
    "text, value", [("3", 3), (" 5 ", 5), ("3.0", 3), ("2.5", None), ("0", None)]
)
def test_a_rating_is_an_integer_from_1_to_5_or_nothing(text, value):
    assert lidc._rating(text) == value
