"""The synthetic cohort's nodule types: drawn in the Cohort's proportions, placed where their type
says (on the wall, on a fissure, on a vessel, clear of all three), labelled without the wall, and
carried with each nodule from the generator through ingest, anonymize and preprocess to
``nodules.csv``; a CSV without them still goes through."""

from __future__ import annotations

import json
import secrets
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from ctpipe import annotations, config, prep, synth
from ctpipe.deid.keys import KEY_ENV
from ctpipe.geometry import index_to_world, sphere_mask, world_grid
from ctpipe.synth_nodules import (
    AIRWAY_WALL_MM,
    NODULE_GAP_MM,
    VESSEL_GAP_MM,
    WALL_GAP_MM,
    _vessel_gap,
)
from stages import anonymize, ingest, preprocess

KINDS = ["type", "texture", "margin", "solid_fraction"]


def drawn(cohort: synth.Cohort, patients: int, seed: int = 5) -> list[tuple[dict, synth.Nodule]]:
    """(anatomy, nodule) of ``patients`` drawn as make_case draws them, without rendering."""
    out = []
    for index in range(patients):
        rng = np.random.default_rng([seed, index])
        synth.make_phi(rng, index)
        geom, shape = synth.make_geometry(rng, cohort)
        centre = index_to_world((np.array(shape[::-1]) - 1) / 2, geom)
        anatomy = synth.make_anatomy(rng, float(centre[2]), cohort)
        out += [(anatomy, n) for n in synth.make_nodules(rng, anatomy, cohort)]
    return out


def ellipsoid(points: np.ndarray, lung: dict) -> np.ndarray:
    """<= 1 inside the lung."""
    return np.sum(((points - lung["c"]) / lung["r"]) ** 2, axis=-1)


def sphere_points(centre, radius: float, n: int = 400) -> np.ndarray:
    """Points spread over a sphere's surface (Fibonacci lattice)."""
    k = np.arange(n) + 0.5
    z, phi = 1 - 2 * k / n, np.pi * (1 + 5**0.5) * k
    ring = np.sqrt(1 - z * z)
    return np.asarray(centre) + radius * np.column_stack(
        [ring * np.cos(phi), ring * np.sin(phi), z]
    )


def test_types_textures_and_margins_come_in_the_cohort_proportions():
    cohort = synth.Cohort(
        juxta_pleural_fraction=0.3,
        perifissural_fraction=0.1,
        juxta_vascular_fraction=0.2,
        part_solid_fraction=0.25,
        ground_glass_fraction=0.15,
        lobulated_fraction=0.2,
        spiculated_fraction=0.1,
    )
    nodules = [n for _, n in drawn(cohort, 400)]
    shares = {
        attr: {k: v / len(nodules) for k, v in Counter(getattr(n, attr) for n in nodules).items()}
        for attr in ("kind", "texture", "margin")
    }
    expected = {
        "kind": {"isolated": 0.4, "juxta_pleural": 0.3, "perifissural": 0.1, "juxta_vascular": 0.2},
        "texture": {"solid": 0.6, "part_solid": 0.25, "ground_glass": 0.15},
        "margin": {"smooth": 0.7, "lobulated": 0.2, "spiculated": 0.1},
    }
    assert len(nodules) > 700
    for attr, want in expected.items():
        assert shares[attr].keys() == want.keys()
        for name, share in want.items():  # binomial sd at n ~ 1000: at most 0.016
            assert shares[attr][name] == pytest.approx(share, abs=0.05), (attr, name)
    median = {
        k: np.median([n.diameter_mm for n in nodules if n.kind == k]) for k in expected["kind"]
    }
    assert all(6 < m < 14 for m in median.values()), median  # log-uniform 3-30 mm: 9.5


def test_each_type_sits_where_it_says():
    """Juxta-pleural spheres touch the lung boundary from inside, perifissural ones the fissure
    plane, juxta-vascular ones overlap a vessel; isolated ones keep clear of wall and vessels, and
    none sits on an airway."""
    seen = Counter()
    for anatomy, nod in drawn(synth.Cohort(), 120, seed=9):
        c, r = np.array(nod.centre_xyz), nod.diameter_mm / 2
        side = int(np.argmin([ellipsoid(c, lung) for lung in anatomy["lungs"]]))
        lung = anatomy["lungs"][side]
        surface = ellipsoid(sphere_points(c, r), lung)
        gap = _vessel_gap(c, anatomy["vessels"]) - r
        airways = [(a, b, (w + AIRWAY_WALL_MM,) * 2) for a, b, w in anatomy["airways"]]
        assert _vessel_gap(c, airways) - r >= VESSEL_GAP_MM - 0.01  # no kind sits on an airway
        seen[nod.kind] += 1
        if nod.kind == "juxta_pleural":
            assert surface.max() == pytest.approx(1.0, abs=0.03)  # touches, from inside
            assert surface.max() <= 1.0 + 1e-3
        else:
            # clear of the wall (the placement shrinks the lung's axes by r + WALL_GAP_MM, which
            # keeps a sphere a little less than WALL_GAP_MM from an ellipsoid's surface)
            assert ellipsoid(sphere_points(c, r + WALL_GAP_MM / 2), lung).max() < 1.0
        if nod.kind == "juxta_vascular":
            assert gap < 0  # the vessel runs into the sphere
        else:
            assert gap >= VESSEL_GAP_MM - 0.01
        if nod.kind == "perifissural":
            point, normal = anatomy["fissures"][side]
            assert abs((c - point) @ normal) == pytest.approx(r, abs=0.02)
    assert set(seen) == {"isolated", "juxta_pleural", "perifissural", "juxta_vascular"}


def test_nodules_keep_apart():
    for index in range(30):
        case_nodules = [n for a, n in drawn(synth.Cohort(max_nodules=4), 1, seed=100 + index)]
        for i, a in enumerate(case_nodules):
            for b in case_nodules[i + 1 :]:
                dist = np.linalg.norm(np.subtract(a.centre_xyz, b.centre_xyz))
                assert dist >= (a.diameter_mm + b.diameter_mm) / 2 + NODULE_GAP_MM - 0.02


def test_a_juxta_pleural_label_holds_nodule_not_wall(tiny_synth):
    """The label preprocess paints (the annotated sphere) lies in the lung, and the painted
    nodule fills it: soft tissue inside the sphere, the wall right beside it."""
    cohort = tiny_synth.but(
        matrix=96,
        pixel_spacing_mm=(2.5, 2.5),
        slice_spacing_mm=(2.5,),
        juxta_pleural_fraction=1.0,
        perifissural_fraction=0.0,
        juxta_vascular_fraction=0.0,
    )
    case = synth.make_case(3, 0, cohort)
    xyz = world_grid(case.shape_kji, case.geometry)
    lung = np.zeros(case.shape_kji, dtype=bool)
    for each in case.anatomy["lungs"]:
        lung |= ellipsoid(xyz, each) <= 1
    assert case.nodules and all(n.kind == "juxta_pleural" for n in case.nodules)
    for nod in case.nodules:
        label = sphere_mask(
            case.shape_kji, case.geometry, np.array(nod.centre_xyz), nod.diameter_mm / 2
        )
        grown = sphere_mask(
            case.shape_kji, case.geometry, np.array(nod.centre_xyz), nod.diameter_mm / 2 + 3
        )
        assert label.sum() > 20 and not (label & ~lung).any()
        if nod.texture == "solid":
            assert np.median(case.hu[label]) > -200
        assert (grown & ~lung).any()  # the wall is within 3 mm of the label


def test_same_seed_same_cohort(tiny_synth):
    a, b = synth.make_case(11, 2, tiny_synth), synth.make_case(11, 2, tiny_synth)
    assert a.nodules == b.nodules and np.array_equal(a.hu, b.hu)
    assert synth.make_case(12, 2, tiny_synth).nodules != a.nodules


def test_cohort_refuses_shares_above_one():
    with pytest.raises(ValueError, match="type shares"):
        synth.Cohort(juxta_pleural_fraction=0.6, juxta_vascular_fraction=0.5)


def test_annotation_columns_are_checked_and_optional():
    base = pd.DataFrame(
        {
            "seriesuid": ["1.2"],
            "coordX": [1.0],
            "coordY": [2.0],
            "coordZ": [3.0],
            "diameter_mm": [8.0],
        }
    )
    assert list(annotations.select(base.assign(notes="free text"), "a.csv").columns) == list(base)
    full = base.assign(type="juxta_pleural", margin=np.nan, solid_fraction="0.5")
    got = annotations.select(full, "a.csv")
    assert list(got.columns) == [*base.columns, "type", "margin", "solid_fraction"]
    assert got["solid_fraction"].iloc[0] == 0.5
    with pytest.raises(ValueError, match=r"a.csv: column 'type', row 2"):
        annotations.select(base.assign(type="Jane Doe"), "a.csv")
    with pytest.raises(ValueError, match=r"a.csv: column 'solid_fraction', row 2"):
        annotations.select(base.assign(solid_fraction=1.5), "a.csv")


@pytest.mark.parametrize(
    ("years", "band"),
    [(None, None), (0.5, "0-9"), (59.9, "50-59"), (60, "60-69"), (89, "80-89"), (97, "90+")],
)
def test_age_band(years, band):
    assert prep.age_band(years) == band


def run(main, *args: Path, params: Path, metrics: Path) -> None:
    argv = [*map(str, args), "--params", str(params), "--metrics", str(metrics)]
    assert main(argv) == 0


def through_the_stages(tmp_path: Path, params: dict) -> Path:
    """ingest, anonymize and preprocess with ``params``; return the processed folder."""
    params["anonymize"]["key_file"] = str(tmp_path / "absent.key")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    raw, anon, processed = tmp_path / "raw", tmp_path / "anon", tmp_path / "processed"
    run(ingest.main, raw, params=path, metrics=tmp_path / "ingest.json")
    run(anonymize.main, raw, anon, params=path, metrics=tmp_path / "anonymize.json")
    run(preprocess.main, anon, processed, params=path, metrics=tmp_path / "preprocess.json")
    return processed


def test_types_travel_from_the_generator_to_nodules_csv(tmp_path, tiny_params, monkeypatch):
    """ingest (synthetic) -> anonymize -> preprocess: every nodule keeps its kinds; index.json
    says sex, age band, scanner and slice thickness of each case."""
    monkeypatch.delenv(KEY_ENV, raising=False)  # the synthetic cohort's public demo key
    params = tiny_params()
    processed = through_the_stages(tmp_path, params)
    cohort = synth.Cohort.from_params(config.validate(params).ingest.synthetic)
    made = [
        n
        for i in range(cohort.n_patients)
        for n in synth.make_case(params["base"]["seed"], i, cohort).nodules
    ]
    truth = pd.DataFrame(
        {
            "coordX": [n.centre_xyz[0] for n in made],
            "type": [n.kind for n in made],
            "texture": [n.texture for n in made],
            "margin": [n.margin for n in made],
            "solid_fraction": [n.solid_fraction for n in made],
        }
    )
    nodules = pd.read_csv(processed / "nodules.csv")
    assert len(nodules) == len(truth) > 0
    got = nodules.sort_values("coordX")[["coordX", *KINDS]].reset_index(drop=True)
    want = truth.sort_values("coordX").reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want, check_dtype=False)
    cases = json.loads((processed / "index.json").read_text())["cases"]
    assert {c["sex"] for c in cases} <= {"F", "M"}
    assert all(c["age_band"][0].isdigit() for c in cases)
    assert {c["scanner"] for c in cases} == {"SYNTHETIC ctpipe-phantom"}
    thickness = {round(s, 3) for s in cohort.slice_spacing_mm}
    assert {c["slice_thickness_mm"] for c in cases} <= thickness


def test_a_csv_without_kinds_goes_through(tmp_path, tiny_params, write_tiny_cohort, monkeypatch):
    """A LUNA16-style CSV (the five columns only) of a DICOM folder: ingest, anonymize and
    preprocess run, and nodules.csv has no kind columns (unknown, not invented)."""
    monkeypatch.setenv(KEY_ENV, secrets.token_hex(32))  # not the synthetic source: a key is needed
    src = tmp_path / "src"
    rows = write_tiny_cohort(src, n=3)
    pd.DataFrame(rows)[annotations.REQUIRED].to_csv(src / "annotations.csv", index=False)
    params = tiny_params()
    params["ingest"].update(
        source="dicom", source_dir=str(src), annotations=str(src / "annotations.csv")
    )
    processed = through_the_stages(tmp_path, params)
    nodules = pd.read_csv(processed / "nodules.csv")
    assert len(nodules) == len(rows) and not set(annotations.OPTIONAL) & set(nodules.columns)
