"""The generator renders a patient slab by slab: the volume does not depend on the slab, and the
working memory is a few volumes, not the tens of a whole-volume pass."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from ctpipe import synth

# Every kind of nodule and a turned grid, so that tubes, spicules and lobes cross slab borders.
VARIED = synth.Cohort(
    matrix=40,
    pixel_spacing_mm=(7.0, 8.0),
    slice_spacing_mm=(4.0,),
    oblique_degrees=25,
    vessels_per_lung=2,
    fraction_without_nodules=0.0,
    diameter_mm=(8, 30),
    juxta_pleural_fraction=0.3,
    juxta_vascular_fraction=0.3,
    part_solid_fraction=0.3,
    ground_glass_fraction=0.2,
    lobulated_fraction=0.4,
    spiculated_fraction=0.4,
)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_volume_does_not_depend_on_the_slab(monkeypatch, index):
    whole = synth.make_case(4, index, VARIED).hu
    assert whole.shape[0] > 40
    for slab in (1, 3, 7):
        monkeypatch.setattr(synth, "SLAB_SLICES", slab)
        assert np.array_equal(synth.make_case(4, index, VARIED).hu, whole), f"slab {slab}"


def test_working_memory_is_a_few_volumes(monkeypatch):
    monkeypatch.setattr(synth, "SLAB_SLICES", 8)
    cohort = VARIED.but(slice_spacing_mm=(1.0,), z_extent_mm=320)  # 320 slices of 40 x 40
    tracemalloc.start()
    try:
        case = synth.make_case(4, 0, cohort)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The volume and the lung texture, float32; a whole-volume pass held over 20 such volumes
    # (the voxel coordinates alone are six).
    assert peak < 4 * case.hu.nbytes, f"peak {peak / case.hu.nbytes:.1f} volumes"
