"""World (LPS millimetres) <-> voxel index conversion: the one place in ctpipe where it is done.

Conventions, the same as ITK / SimpleITK:
    * a ``Geometry`` holds ``origin`` (x, y, z of voxel index 0 in mm), ``spacing`` (mm per index
      step along i, j, k) and ``direction`` (3x3; column c is the world direction of index axis c).
    * an *index* is ``(i, j, k)``: i runs along columns, j along rows, k along slices.
    * a numpy array of a volume is indexed ``[k, j, i]`` (``sitk.GetArrayFromImage`` order); use
      :func:`world_to_array_index` / :func:`array_index_to_world` when you hold such an array.

The conversion is ``xyz = origin + D @ (spacing * ijk)`` and its inverse
``ijk = inv(D) @ (xyz - origin) / spacing`` (componentwise division after the matrix product; the
dlwpt-code ``xyz2irc`` bug, issue #96, put it on the wrong side).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk


@dataclass(frozen=True)
class Geometry:
    """Origin, spacing and direction of a 3D volume in LPS world coordinates."""

    origin: np.ndarray
    spacing: np.ndarray
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        object.__setattr__(self, "origin", np.asarray(self.origin, dtype=np.float64).reshape(3))
        object.__setattr__(self, "spacing", np.asarray(self.spacing, dtype=np.float64).reshape(3))
        object.__setattr__(
            self, "direction", np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        )
        if np.any(self.spacing <= 0):
            raise ValueError(f"spacing must be positive, got {self.spacing}")
        if not np.all(np.isfinite(self.origin)) or not np.all(np.isfinite(self.spacing)):
            raise ValueError(
                f"origin and spacing must be finite, got {self.origin}, {self.spacing}"
            )
        # D^T D = I: unit, mutually perpendicular columns (a determinant of 1 also admits shears)
        if not np.allclose(self.direction.T @ self.direction, np.eye(3), atol=1e-3):
            raise ValueError(f"direction is not orthonormal: {self.direction.tolist()}")

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Geometry:
        return cls(image.GetOrigin(), image.GetSpacing(), np.reshape(image.GetDirection(), (3, 3)))

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Set this geometry on ``image`` (in place) and return it."""
        image.SetOrigin(tuple(self.origin))
        image.SetSpacing(tuple(self.spacing))
        image.SetDirection(tuple(self.direction.ravel()))
        return image

    def to_dict(self) -> dict[str, list[float]]:
        return {
            "origin": self.origin.tolist(),
            "spacing": self.spacing.tolist(),
            "direction": self.direction.ravel().tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        return cls(d["origin"], d["spacing"], np.reshape(d["direction"], (3, 3)))

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))


def index_to_world(ijk: np.ndarray, geom: Geometry) -> np.ndarray:
    """Continuous index ``(..., 3)`` in (i, j, k) order -> world LPS mm ``(..., 3)``."""
    ijk = np.asarray(ijk, dtype=np.float64)
    return geom.origin + (ijk * geom.spacing) @ geom.direction.T


def world_to_index(xyz: np.ndarray, geom: Geometry) -> np.ndarray:
    """World LPS mm ``(..., 3)`` -> continuous index ``(..., 3)`` in (i, j, k) order."""
    xyz = np.asarray(xyz, dtype=np.float64)
    return ((xyz - geom.origin) @ np.linalg.inv(geom.direction).T) / geom.spacing


def world_to_array_index(xyz: np.ndarray, geom: Geometry) -> np.ndarray:
    """World mm -> continuous index in numpy ``[k, j, i]`` order."""
    return world_to_index(xyz, geom)[..., ::-1]


def array_index_to_world(kji: np.ndarray, geom: Geometry) -> np.ndarray:
    """Continuous numpy ``[k, j, i]`` index -> world mm."""
    return index_to_world(np.asarray(kji, dtype=np.float64)[..., ::-1], geom)


def world_grid(
    shape_kji: tuple[int, int, int], geom: Geometry, slices: tuple[int, int] | None = None
) -> np.ndarray:
    """World coordinates of every voxel centre of an array of ``shape_kji``: ``(k, j, i, 3)``.

    ``slices=(first, stop)``: only the slab of slices ``first <= k < stop``, the same values as
    the whole grid's rows there.
    """
    first, stop = slices if slices is not None else (0, shape_kji[0])
    k, j, i = np.meshgrid(np.arange(first, stop), *map(np.arange, shape_kji[1:]), indexing="ij")
    return array_index_to_world(np.stack([k, j, i], axis=-1), geom)


def sphere_mask(
    shape_kji: tuple[int, int, int], geom: Geometry, centre_xyz: np.ndarray, radius_mm: float
) -> np.ndarray:
    """Boolean mask of the voxels whose centres lie within ``radius_mm`` of a world point.

    Only the bounding box of the sphere is evaluated, so this is cheap for small nodules in large
    volumes.
    """
    mask = np.zeros(shape_kji, dtype=bool)
    centre = world_to_array_index(centre_xyz, geom)
    # inv(D) is a rotation, so the sphere's index-space half-extent along each axis is r / spacing.
    reach = radius_mm / geom.spacing[::-1] + 1
    lo = np.maximum(np.floor(centre - reach).astype(int), 0)
    hi = np.minimum(np.ceil(centre + reach).astype(int) + 1, shape_kji)
    if np.any(hi <= lo):
        return mask
    sub = tuple(slice(a, b) for a, b in zip(lo, hi))
    k, j, i = np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi)), indexing="ij")
    world = array_index_to_world(np.stack([k, j, i], axis=-1), geom)
    mask[sub] = np.sum((world - centre_xyz) ** 2, axis=-1) <= radius_mm**2
    return mask


def contains(shape_kji: tuple[int, int, int], geom: Geometry, xyz: np.ndarray) -> bool:
    """Whether a world point falls inside the volume (within half a voxel of its edge voxels)."""
    kji = world_to_array_index(xyz, geom)
    return bool(np.all(kji >= -0.5) and np.all(kji <= np.asarray(shape_kji) - 0.5))
