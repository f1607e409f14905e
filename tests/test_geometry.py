"""World <-> voxel conversion with a non-identity, non-symmetric direction, anisotropic spacing
and a non-zero origin, checked against SimpleITK's own transform."""

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from ctpipe.geometry import (
    Geometry,
    array_index_to_world,
    contains,
    index_to_world,
    sphere_mask,
    world_to_array_index,
    world_to_index,
)


def oblique_direction() -> np.ndarray:
    """A rotation about (1, 2, 3) by 35 degrees: orthonormal, not symmetric, not a permutation."""
    axis = np.array([1.0, 2.0, 3.0]) / np.linalg.norm([1.0, 2.0, 3.0])
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = np.deg2rad(35)
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


@pytest.fixture
def geom() -> Geometry:
    return Geometry(origin=(-120.5, 33.25, -410.0), spacing=(0.7, 0.9, 2.5), direction=oblique_direction())


def test_direction_is_not_symmetric(geom):
    assert not np.allclose(geom.direction, geom.direction.T)


def test_round_trip(geom):
    rng = np.random.default_rng(0)
    ijk = rng.uniform(-5, 60, size=(100, 3))
    np.testing.assert_allclose(world_to_index(index_to_world(ijk, geom), geom), ijk, atol=1e-9)
    kji = ijk[:, ::-1]
    np.testing.assert_allclose(world_to_array_index(array_index_to_world(kji, geom), geom), kji, atol=1e-9)


def test_matches_simpleitk(geom):
    image = geom.apply_to(sitk.Image(40, 30, 20, sitk.sitkUInt8))
    for ijk in [(0, 0, 0), (3.5, 7.25, 11.0), (39, 29, 19)]:
        expected = image.TransformContinuousIndexToPhysicalPoint(ijk)
        np.testing.assert_allclose(index_to_world(ijk, geom), expected, atol=1e-9)
        np.testing.assert_allclose(world_to_index(expected, geom), ijk, atol=1e-9)
    back = Geometry.from_sitk(image)
    np.testing.assert_allclose(back.direction, geom.direction, atol=1e-12)
    np.testing.assert_allclose(back.origin, geom.origin)


def test_dlwpt_bug_would_be_caught(geom):
    """Multiplying by the inverse direction on the wrong side (dlwpt-code issue #96) is wrong here."""
    xyz = index_to_world([10.0, 5.0, 3.0], geom)
    wrong = (xyz - geom.origin) @ np.linalg.inv(geom.direction) / geom.spacing
    assert not np.allclose(wrong, [10.0, 5.0, 3.0], atol=0.1)
    np.testing.assert_allclose(world_to_index(xyz, geom), [10.0, 5.0, 3.0], atol=1e-9)


def test_sphere_found_back_in_oblique_volume(geom):
    shape = (40, 80, 70)  # [k, j, i]
    centre_index = np.array([30.0, 41.0, 17.0])  # (i, j, k), off the grid centre
    centre = index_to_world(centre_index, geom)
    mask = sphere_mask(shape, geom, centre, radius_mm=9.0)
    assert mask.sum() > 0
    found = array_index_to_world(np.array(ndimage.center_of_mass(mask)), geom)
    assert np.linalg.norm(found - centre) < 0.5 * geom.spacing.max()
    # Voxel count matches the sphere's volume within discretisation error.
    expected = 4 / 3 * np.pi * 9.0**3 / geom.voxel_volume_mm3
    assert abs(mask.sum() - expected) / expected < 0.1


def test_contains(geom):
    shape = (20, 30, 40)
    assert contains(shape, geom, index_to_world([0, 0, 0], geom))
    assert contains(shape, geom, index_to_world([39, 29, 19], geom))
    assert not contains(shape, geom, index_to_world([-1, 0, 0], geom))
    assert not contains(shape, geom, index_to_world([0, 0, 20], geom))


def test_rejects_bad_geometry():
    with pytest.raises(ValueError):
        Geometry((0, 0, 0), (1, 0, 1))
    with pytest.raises(ValueError):
        Geometry((0, 0, 0), (1, 1, 1), np.ones((3, 3)))
