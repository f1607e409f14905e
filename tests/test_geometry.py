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
    world_grid,
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
    return Geometry(
        origin=(-120.5, 33.25, -410.0), spacing=(0.7, 0.9, 2.5), direction=oblique_direction()
    )


def test_round_trip(geom):
    rng = np.random.default_rng(0)
    ijk = rng.uniform(-5, 60, size=(100, 3))
    np.testing.assert_allclose(world_to_index(index_to_world(ijk, geom), geom), ijk, atol=1e-9)
    kji = ijk[:, ::-1]
    np.testing.assert_allclose(
        world_to_array_index(array_index_to_world(kji, geom), geom), kji, atol=1e-9
    )


def test_matches_simpleitk(geom):
    image = geom.apply_to(sitk.Image(40, 30, 20, sitk.sitkUInt8))
    for ijk in [(0, 0, 0), (3.5, 7.25, 11.0), (39, 29, 19)]:
        expected = image.TransformContinuousIndexToPhysicalPoint(ijk)
        np.testing.assert_allclose(index_to_world(ijk, geom), expected, atol=1e-9)
        np.testing.assert_allclose(world_to_index(expected, geom), ijk, atol=1e-9)
    back = Geometry.from_sitk(image)
    np.testing.assert_allclose(back.direction, geom.direction, atol=1e-12)
    np.testing.assert_allclose(back.origin, geom.origin)


def test_world_to_index_matches_simpleitk_inverse(geom):
    """World points anywhere, mapped back to continuous indices as SimpleITK maps them.

    ``(xyz - origin) @ inv(D) / spacing`` (dlwpt-code issue #96: the inverse direction on the
    wrong side), division before the matrix product, or spacing in (k, j, i) order all miss here.
    """
    image = geom.apply_to(sitk.Image(40, 30, 20, sitk.sitkUInt8))
    rng = np.random.default_rng(1)
    xyz = geom.origin + rng.uniform(-80, 80, size=(50, 3))
    expected = np.array([image.TransformPhysicalPointToContinuousIndex(p) for p in xyz])
    np.testing.assert_allclose(world_to_index(xyz, geom), expected, atol=1e-9)
    np.testing.assert_allclose(world_to_array_index(xyz, geom), expected[:, ::-1], atol=1e-9)


def test_array_index_order_matches_simpleitk_arrays(geom):
    """A voxel set at ``array[k, j, i]`` is where SimpleITK puts that array's voxel in the world."""
    array = np.zeros((5, 6, 7), dtype=np.uint8)  # [k, j, i], three different lengths
    kji = (3, 1, 5)
    array[kji] = 1
    image = geom.apply_to(sitk.GetImageFromArray(array))
    size = image.GetSize()  # (i, j, k) lengths
    (ijk,) = [v for v in np.ndindex(*size) if image.GetPixel(*map(int, v))]  # ITK's own index
    expected = image.TransformIndexToPhysicalPoint([int(v) for v in ijk])
    np.testing.assert_allclose(array_index_to_world(kji, geom), expected, atol=1e-9)
    np.testing.assert_allclose(world_to_array_index(expected, geom), kji, atol=1e-9)
    grid = world_grid(array.shape, geom)
    np.testing.assert_allclose(grid[kji], expected, atol=1e-9)
    np.testing.assert_allclose(grid[0, 0, 0], geom.origin, atol=1e-12)


def test_index_to_world_by_hand_on_a_cyclic_permutation():
    """Index axes i, j, k pointing along world y, z, x: a direction that is not symmetric.

    Worked by hand: xyz = origin + 1 * 0.7 * y + 2 * 0.9 * z + 3 * 2.5 * x.
    """
    direction = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # columns: y, z, x
    geom = Geometry(origin=(10.0, 20.0, 30.0), spacing=(0.7, 0.9, 2.5), direction=direction)
    np.testing.assert_allclose(index_to_world([1, 2, 3], geom), [17.5, 20.7, 31.8], atol=1e-12)
    np.testing.assert_allclose(world_to_index([17.5, 20.7, 31.8], geom), [1, 2, 3], atol=1e-12)
    np.testing.assert_allclose(array_index_to_world([3, 2, 1], geom), [17.5, 20.7, 31.8])
    np.testing.assert_allclose(world_to_array_index([17.5, 20.7, 31.8], geom), [3, 2, 1])


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
