"""The nodules of the synthetic cohort (:mod:`ctpipe.synth`): what kinds, where, and how painted.

Three independent properties, each drawn per nodule in the proportions of
:class:`ctpipe.synth.Cohort` (sources in ``docs/data.md``):

- where it sits (``type``): ``isolated`` in the parenchyma, clear of the wall and of vessels;
  ``juxta_pleural``, a sphere inside the lung touching its boundary (costal or mediastinal
  pleura); ``perifissural``, touching the fissure sheet of its lung; ``juxta_vascular``, a vessel
  running into it;
- texture: ``solid``; ``part_solid``, a solid core inside a ground-glass halo; ``ground_glass``,
  the halo alone;
- margin: ``smooth``; ``lobulated``, the radius swelling into 3-5 lobes; ``spiculated``, thin
  strands radiating from the surface.

The label stays what ``annotations.csv`` says, a sphere of the annotated diameter (preprocess paints
it): a juxta-pleural nodule lies wholly inside the lung, so its label holds no wall; lobes swell up
to about 30 % of the radius past it and the contour between them dips up to 15 % inside; spicules
stay outside it, as volumetry leaves them out. Nodules are painted only inside the lungs, and only
in their bounding box (rendering stays as fast as with spheres alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ctpipe.geometry import Geometry, world_to_array_index

if TYPE_CHECKING:
    from ctpipe.synth import Cohort

HALO_HU = (-600.0, -400.0)  # ground glass: drawn per nodule, uniform
SOLID_HU = (20.0, 60.0)  # soft tissue: drawn per nodule, uniform
PART_SOLID_CORE = (0.3, 0.6)  # core diameter over the nodule's, uniform
WALL_GAP_MM = 4.0  # the lung's semi-axes shrink by r + this for all but juxta-pleural nodules
NODULE_GAP_MM = 10.0  # between the surfaces of two nodules
VESSEL_GAP_MM = 2.0  # a nodule stays this far from the airways and, unless juxta-vascular, vessels
AIRWAY_WALL_MM = 1.5  # thickness of the airway walls
VESSEL_OVERLAP = 0.5  # juxta-vascular: overlap depth with its vessel, share of the vessel radius
WALL_Z = 0.6  # juxta-pleural nodules avoid the apex and the base: |normalised z| up to this
LOBES = (3, 6)  # lobes of a lobulated nodule: integers in [lo, hi)
LOBE_AMPLITUDE = (0.15, 0.3)  # radius swelling of a lobe, share of the radius
SPICULES = (6, 13)  # spicules of a spiculated nodule: integers in [lo, hi)
SPICULE_LENGTH = (0.4, 1.0)  # beyond the surface, share of the radius, plus 2 mm
PLACEMENT_TRIES = 50  # positions tried for one diameter before another diameter is drawn
DIAMETER_TRIES = 20  # diameters tried before the cohort is called impossible

TYPES = ("isolated", "juxta_pleural", "perifissural", "juxta_vascular")
TEXTURES = ("solid", "part_solid", "ground_glass")
MARGINS = ("smooth", "lobulated", "spiculated")


@dataclass(frozen=True)
class Nodule:
    centre_xyz: tuple[float, float, float]
    diameter_mm: float
    solid_fraction: float  # 1.0 solid; (0, 1) part-solid: a solid core in a halo; 0.0 ground glass
    kind: str = "isolated"  # where it sits: one of TYPES (the ``type`` column)
    margin: str = "smooth"  # one of MARGINS
    lobes: tuple = ()  # ((unit direction xyz), amplitude) per lobe (lobulated)
    spicules: tuple = ()  # ((unit direction xyz), length mm beyond the surface) (spiculated)

    @property
    def texture(self) -> str:
        if self.solid_fraction >= 1.0:
            return "solid"
        return "part_solid" if self.solid_fraction > 0 else "ground_glass"


def _pick(rng: np.random.Generator, names: tuple[str, ...], shares: tuple[float, ...]) -> str:
    """``names[0]`` with what the other shares leave, ``names[i]`` with ``shares[i - 1]``."""
    u, edge = rng.random(), 0.0
    for name, share in zip(names[1:], shares):
        edge += share
        if u < edge:
            return name
    return names[0]


def make_nodules(rng: np.random.Generator, anatomy: dict, cohort: Cohort) -> list[Nodule]:
    """0..max nodules in the lungs, log-uniform diameters, each of a drawn type, texture and margin."""
    n = (
        0
        if rng.random() < cohort.fraction_without_nodules
        else int(rng.integers(1, cohort.max_nodules + 1))
    )
    nodules: list[Nodule] = []
    while len(nodules) < n:
        kind = _pick(
            rng,
            TYPES,
            (
                cohort.juxta_pleural_fraction,
                cohort.perifissural_fraction,
                cohort.juxta_vascular_fraction,
            ),
        )
        texture = _pick(rng, TEXTURES, (cohort.part_solid_fraction, cohort.ground_glass_fraction))
        margin = _pick(rng, MARGINS, (cohort.lobulated_fraction, cohort.spiculated_fraction))
        for _ in range(DIAMETER_TRIES):  # a diameter this kind finds room for (most: the first)
            d = float(np.exp(rng.uniform(*np.log(cohort.diameter_mm))))
            placed = _place(rng, kind, d / 2, anatomy, nodules)
            if placed is not None:
                break
        else:
            raise RuntimeError(f"no room for a {kind} nodule in this anatomy: check the Cohort")
        if texture == "part_solid":
            solid = rng.uniform(*PART_SOLID_CORE)
        else:
            solid = 1.0 if texture == "solid" else 0.0
        nodules.append(
            Nodule(
                tuple(float(v) for v in np.round(placed, 2)),
                round(d, 2),
                round(float(solid), 3),
                kind,
                margin,
                _lobes(rng) if margin == "lobulated" else (),
                _spicules(rng, d / 2) if margin == "spiculated" else (),
            )
        )
    return nodules


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(0, 1, 3)
    return v / np.linalg.norm(v)


def _lobes(rng: np.random.Generator) -> tuple:
    return tuple(
        (tuple(np.round(_unit(rng), 4)), round(rng.uniform(*LOBE_AMPLITUDE), 3))
        for _ in range(int(rng.integers(*LOBES)))
    )


def _spicules(rng: np.random.Generator, radius: float) -> tuple:
    return tuple(
        (tuple(np.round(_unit(rng), 4)), round(rng.uniform(*SPICULE_LENGTH) * radius + 2.0, 2))
        for _ in range(int(rng.integers(*SPICULES)))
    )


def _place(
    rng: np.random.Generator, kind: str, r: float, anatomy: dict, others: list[Nodule]
) -> np.ndarray | None:
    """A centre for a nodule of ``kind`` and radius ``r`` that fits the anatomy and ``others``."""
    for _ in range(PLACEMENT_TRIES):
        side = int(rng.integers(0, 2))
        lung = anatomy["lungs"][side]
        if kind == "juxta_pleural":
            centre = _on_wall(rng, lung, r)
        elif kind == "perifissural":
            centre = _on_fissure(rng, lung, anatomy["fissures"][side], r)
        elif kind == "juxta_vascular":
            centre = _on_vessel(rng, lung, anatomy["vessels"], r)
        else:
            centre = lung["c"] + rng.uniform(-1, 1, 3) * lung["r"]
        if centre is not None and _fits(centre, r, kind, lung, anatomy, others):
            return centre
    return None


def _fits(c: np.ndarray, r: float, kind: str, lung: dict, anatomy: dict, others: list) -> bool:
    if kind != "juxta_pleural":  # the others keep clear of the wall
        room = lung["r"] - r - WALL_GAP_MM
        if np.any(room <= 0) or np.sum(((c - lung["c"]) / room) ** 2) > 1:
            return False
    airways = [(a, b, (w + AIRWAY_WALL_MM,) * 2) for a, b, w in anatomy["airways"]]
    if _vessel_gap(c, airways) < r + VESSEL_GAP_MM:
        return False
    if kind != "juxta_vascular" and _vessel_gap(c, anatomy["vessels"]) < r + VESSEL_GAP_MM:
        return False
    return all(
        np.linalg.norm(c - np.array(o.centre_xyz)) >= r + o.diameter_mm / 2 + NODULE_GAP_MM
        for o in others
    )


def _vessel_gap(c: np.ndarray, vessels: list) -> float:
    """Distance from ``c`` to the surface of the nearest tube ``(a, b, (r_a, r_b))`` of ``vessels``
    (negative inside one)."""
    if not vessels:
        return np.inf
    a = np.array([v[0] for v in vessels])
    b = np.array([v[1] for v in vessels])
    r = np.array([v[2] for v in vessels])  # (r at a, r at b)
    ab = b - a
    t = np.clip(np.einsum("ij,ij->i", c - a, ab) / np.einsum("ij,ij->i", ab, ab), 0, 1)
    dist = np.linalg.norm(c - (a + t[:, None] * ab), axis=1)
    return float(np.min(dist - (r[:, 0] + (r[:, 1] - r[:, 0]) * t)))


def _on_wall(rng: np.random.Generator, lung: dict, r: float) -> np.ndarray | None:
    """A sphere inside the lung that touches its boundary at a point away from apex and base.

    The sphere is tangent to the ellipsoid from inside; it stays inside as long as ``r`` is at most
    the smallest radius of curvature of the ellipsoid (shortest semi-axis squared over the longest).
    """
    if r > np.min(lung["r"]) ** 2 / np.max(lung["r"]):
        return None
    z, phi = rng.uniform(-WALL_Z, WALL_Z), rng.uniform(0, 2 * np.pi)
    u = np.array([np.sqrt(1 - z * z) * np.cos(phi), np.sqrt(1 - z * z) * np.sin(phi), z])
    point = lung["c"] + lung["r"] * u  # on the boundary
    outward = u / lung["r"]
    return point - outward / np.linalg.norm(outward) * r


def _on_fissure(rng: np.random.Generator, lung: dict, fissure: tuple, r: float) -> np.ndarray:
    """A sphere touching the fissure plane of its lung, on either side of it."""
    point, normal = fissure
    e1 = np.cross(normal, [1.0, 0.0, 0.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(normal, e1)
    reach = 0.7 * np.max(lung["r"])
    q = point + (e1 * rng.uniform(-1, 1) + e2 * rng.uniform(-1, 1)) * reach
    return q + normal * r * rng.choice([-1.0, 1.0])


def _on_vessel(rng: np.random.Generator, lung: dict, vessels: list, r: float) -> np.ndarray | None:
    """A sphere beside a vessel segment of this lung, overlapping it by part of its radius."""
    mine = [v for v in vessels if np.sum((((v[0] + v[1]) / 2 - lung["c"]) / lung["r"]) ** 2) < 1]
    if not mine:
        return None
    a, b, (ra, rb) = mine[int(rng.integers(0, len(mine)))]
    t = rng.uniform(0.2, 0.9)
    axis = (b - a) / np.linalg.norm(b - a)
    across = _unit(rng)
    across -= axis * (across @ axis)
    across /= np.linalg.norm(across)
    rv = ra + (rb - ra) * t
    return a + (b - a) * t + across * (r + (1 - VESSEL_OVERLAP) * rv)


def box_of(
    lo: np.ndarray, hi: np.ndarray, geom: Geometry, shape: tuple, first: int = 0
) -> tuple[slice, ...] | None:
    """The array slices of the voxels within the world box ``lo``..``hi`` (None: outside).

    The array of ``shape`` is the slab of ``geom``'s grid that starts at slice ``first``.
    """
    corners = np.array(
        [[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
    )
    kji = world_to_array_index(corners, geom)
    shift = np.array([first, 0, 0])
    start = np.maximum(np.floor(kji.min(axis=0)).astype(int) - shift, 0)
    stop = np.minimum(np.ceil(kji.max(axis=0)).astype(int) + 1 - shift, shape)
    if np.any(stop <= start):
        return None
    return tuple(slice(s0, s1) for s0, s1 in zip(start, stop))


def segment_distance(
    points: np.ndarray, a: np.ndarray, b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Distance of each point to segment a-b, and the position ``t`` in [0, 1] of its foot."""
    ab = b - a
    t = np.clip(((points - a) @ ab) / (ab @ ab), 0, 1)
    return np.linalg.norm(points - (a + t[..., None] * ab), axis=-1), t


def paint_tube(hu, xyz, geom, a, b, radius, value, within, first: int = 0) -> None:
    """Set voxels within ``radius`` of segment a-b to ``value``, looking only in its bounding box.

    ``radius`` is a number, or ``(r_a, r_b)`` for a tube that tapers linearly from a to b. ``hu``,
    ``xyz`` and ``within`` are the slab of ``geom``'s grid that starts at slice ``first``.
    """
    r_a, r_b = radius if isinstance(radius, tuple) else (radius, radius)
    reach = max(r_a, r_b)
    box = box_of(np.minimum(a, b) - reach, np.maximum(a, b) + reach, geom, hu.shape, first)
    if box is None:
        return
    dist, t = segment_distance(xyz[box], a, b)
    near = dist <= r_a + (r_b - r_a) * t
    if within is not None:
        near &= within[box]
    hu[box][near] = value


def nodule_shades(nod: Nodule, rng: np.random.Generator) -> tuple[float | None, float | None]:
    """The HU of ``nod``'s ground-glass halo and of its solid part (None: it has none)."""
    halo = rng.uniform(*HALO_HU) if nod.solid_fraction < 1.0 else None
    solid = rng.uniform(*SOLID_HU) if nod.solid_fraction > 0.0 else None
    return halo, solid


def paint_nodule(
    hu: np.ndarray,
    xyz: np.ndarray,
    geom: Geometry,
    nod: Nodule,
    in_lung: np.ndarray,
    shades: tuple[float | None, float | None],
    first: int = 0,
) -> None:
    """Paint ``nod`` into ``hu`` (float32 HU on the grid of ``xyz``), inside the lungs only, in the
    ``shades`` of :func:`nodule_shades`. The arrays are the slab that starts at slice ``first``."""
    c, r = np.array(nod.centre_xyz, dtype=np.float32), nod.diameter_mm / 2
    swell = sum(amp for _, amp in nod.lobes)  # bounds the lobe factor
    box = box_of(c - r * (1 + swell), c + r * (1 + swell), geom, hu.shape, first)
    halo, solid = shades
    if box is not None:
        offset = xyz[box] - c
        dist = np.linalg.norm(offset, axis=-1)
        radius = r * _lobe_factor(offset, dist, nod.lobes)
        lung, view = in_lung[box], hu[box]
        if halo is not None:
            inside = (dist <= radius) & lung
            view[inside] = np.maximum(view[inside], halo)
        if solid is not None:
            view[(dist <= radius * nod.solid_fraction) & lung] = solid
    thick = 0.6 * float(np.max(geom.spacing[:2]))  # strands stay visible on the pixel grid
    for direction, length in nod.spicules:
        u = np.asarray(direction, dtype=np.float32)
        start, end = c + u * 0.8 * r, c + u * (r + length)
        value = solid if solid is not None else halo
        paint_tube(hu, xyz, geom, start, end, (thick, 0.3 * thick), value, in_lung, first)


def _lobe_factor(offset: np.ndarray, dist: np.ndarray, lobes: tuple) -> np.ndarray | float:
    """Radius over the nominal one per voxel direction: 1 for a smooth nodule; for a lobulated one
    ``1 + sum a_k (max(0, cos angle_k) ** 4 - 0.1)`` (0.1 is the mean of the power over the sphere,
    so the volume stays about the sphere's)."""
    if not lobes:
        return 1.0
    unit = offset / np.maximum(dist, 1e-6)[..., None]
    factor = np.ones(dist.shape, dtype=np.float32)
    for direction, amplitude in lobes:
        cos = unit @ np.asarray(direction, dtype=np.float32)
        factor += amplitude * (np.maximum(cos, 0) ** 4 - 0.1)
    return factor
