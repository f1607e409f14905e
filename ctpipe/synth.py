"""The built-in synthetic chest-CT cohort: what a hospital export looks like, with no real patient.

Each patient gets one study folder of single-frame CT Image Storage files (one per slice) with
correct geometry and realistic PHI everywhere a real export has it: the main dataset, free-text
descriptions, vendor private tags and nested sequences. The anatomy is analytic and defined in
world (LPS mm) coordinates, so the same patient can be written on an axial or an oblique grid and
the ground truth (LUNA16 ``annotations.csv``, world mm) stays exact:

    body (soft tissue, fat rim) > two lungs (-850 HU), each with a fissure sheet > airways (air,
    with walls) and a vessel tree (blood, the natural false positives) > nodules 3-30 mm; spine;
    noise.

Nodules (:mod:`ctpipe.synth_nodules`) are isolated, juxta-pleural, perifissural or juxta-vascular;
solid, part-solid or pure ground glass; smooth, lobulated or spiculated, each drawn per nodule in
the proportions of :class:`Cohort`. The shares of LIDC-IDRI and screening cohorts and why the
defaults enrich the rare kinds: ``docs/data.md``. ``annotations.csv`` names each nodule's kinds
(``type``, ``texture``, ``margin``, ``solid_fraction``; :mod:`ctpipe.annotations`).

Everything is drawn from ``numpy.random.default_rng([seed, patient_index])``: the same params write
byte-identical files.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from ctpipe import synth_ratings
from ctpipe.annotations import COLUMNS
from ctpipe.geometry import Geometry, index_to_world, world_grid
from ctpipe.phi import make_phi, phi_dataset
from ctpipe.synth_nodules import (
    AIRWAY_WALL_MM,
    Nodule,
    make_nodules,
    nodule_shades,
    paint_nodule,
    paint_tube,
)

UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root, as real exports carry a vendor root
SLAB_SLICES = 16  # slices rendered at once: bounds the generator's working memory, not its output


@dataclass(frozen=True)
class Cohort:
    """How patients are drawn. ``params.yaml`` sets the size (``ingest.synthetic``); the rest is the
    cohort's fixed look, which tests and benchmarks vary (``dataclasses.replace``)."""

    n_patients: int = 60
    matrix: int = 160  # rows = columns of a slice
    pixel_spacing_mm: tuple[float, float] = (1.6, 2.2)  # drawn per patient, uniform
    slice_spacing_mm: tuple[float, ...] = (2.0, 2.5, 3.0)  # drawn per patient, one of these
    z_extent_mm: float = 200  # cranio-caudal coverage
    oblique_degrees: float = 0  # > 0: the grid turned by this angle about a skew axis
    vessels_per_lung: int = 6  # branching vessel trees per lung (the natural false positives)
    fraction_without_nodules: float = 0.15
    max_nodules: int = 4  # per patient with nodules: 1..max
    diameter_mm: tuple[float, float] = (3, 30)  # log-uniform
    # Shares of nodules, three independent draws per nodule (docs/data.md: sources, enrichment).
    # Where it sits (``type``); the rest are isolated.
    juxta_pleural_fraction: float = 0.25  # touching the chest wall or mediastinum
    perifissural_fraction: float = 0.10  # touching a fissure
    juxta_vascular_fraction: float = 0.20  # a vessel running into it
    # Texture; the rest are solid.
    part_solid_fraction: float = 0.20  # a solid core in a ground-glass halo
    ground_glass_fraction: float = 0.10  # the halo alone (pure ground glass)
    # Margin; the rest are smooth.
    lobulated_fraction: float = 0.15
    spiculated_fraction: float = 0.10
    fissure_hu: float = -750.0  # the fissure sheet of each lung, about one voxel thick
    blur_voxels: float = 0.6  # partial-volume blur (Gaussian sigma)
    noise_hu: float = 20  # scanner noise (Gaussian sigma)
    hu_offset: float = 0.0  # a calibration shift (drifted cohorts of the monitoring tests)
    kernel: str | None = None  # ConvolutionKernel written when set

    def __post_init__(self) -> None:
        groups = {
            "type": ("juxta_pleural_fraction", "perifissural_fraction", "juxta_vascular_fraction"),
            "texture": ("part_solid_fraction", "ground_glass_fraction"),
            "margin": ("lobulated_fraction", "spiculated_fraction"),
        }
        for group, names in groups.items():
            shares = [getattr(self, name) for name in names]
            if min(shares) < 0 or sum(shares) > 1:
                raise ValueError(
                    f"Cohort {group} shares {dict(zip(names, shares))}: each >= 0, sum <= 1"
                )

    @classmethod
    def from_params(cls, params) -> Cohort:
        """The cohort of ``ingest.synthetic`` (:class:`ctpipe.config.Synthetic`): a smaller matrix
        covers the same chest with proportionally coarser pixels and slices."""
        scale = cls.matrix / params.matrix
        return cls(
            n_patients=params.n_patients,
            matrix=params.matrix,
            oblique_degrees=params.oblique_degrees,
            pixel_spacing_mm=tuple(s * scale for s in cls.pixel_spacing_mm),
            slice_spacing_mm=tuple(s * scale for s in cls.slice_spacing_mm),
        )

    def but(self, **changes) -> Cohort:
        """A copy with ``changes``."""
        return replace(self, **changes)


@dataclass
class SyntheticCase:
    """One patient: identity, acquisition geometry, anatomy (world mm) and nodules."""

    index: int
    phi: dict
    geometry: Geometry
    shape_kji: tuple[int, int, int]
    nodules: list[Nodule]
    anatomy: dict
    hu: np.ndarray | None = None
    kernel: str | None = None  # ConvolutionKernel written when set (``Cohort.kernel``)


def make_geometry(rng: np.random.Generator, cohort: Cohort) -> tuple[Geometry, tuple]:
    """Anisotropic, patient-specific acquisition grid covering the chest."""
    n = cohort.matrix
    pixel = rng.uniform(*cohort.pixel_spacing_mm)
    dz = float(rng.choice(cohort.slice_spacing_mm))
    n_slices = int(round(cohort.z_extent_mm / dz))
    direction = np.eye(3)
    if cohort.oblique_degrees > 0:
        # A rotation about an axis that is neither x, y nor z: a non-symmetric direction matrix.
        angle = np.deg2rad(cohort.oblique_degrees)
        axis = np.array([1.0, 0.4, 0.2]) / np.linalg.norm([1.0, 0.4, 0.2])
        kx = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        direction = np.eye(3) + np.sin(angle) * kx + (1 - np.cos(angle)) * kx @ kx
    spacing = np.array([pixel, pixel, dz])
    # Centre the grid on the chest (world origin), with a small patient-specific offset.
    extent = spacing * (np.array([n, n, n_slices]) - 1)
    centre = np.array([rng.uniform(-5, 5), rng.uniform(-5, 5), -150.0 + rng.uniform(-20, 20)])
    origin = centre - direction @ (extent / 2)
    return Geometry(origin, spacing, direction), (n_slices, n, n)


def make_anatomy(rng: np.random.Generator, centre_z: float, cohort: Cohort) -> dict:
    """Body, lungs, airways and vessel tree as analytic shapes in world mm."""
    body = {"a": rng.uniform(140, 165), "b": rng.uniform(100, 120), "cy": rng.uniform(-5, 5)}
    lungs = []
    for side in (-1, 1):  # LPS: -x is the patient's right
        lungs.append(
            {
                "c": np.array(
                    [side * rng.uniform(62, 72), rng.uniform(-5, 5), centre_z + rng.uniform(-5, 5)]
                ),
                "r": np.array([rng.uniform(45, 55), rng.uniform(65, 75), rng.uniform(85, 100)]),
            }
        )
    hilum_z = centre_z + 25
    trachea = [np.array([0.0, -15.0, centre_z + 120]), np.array([0.0, -15.0, hilum_z])]
    airways = [(trachea[0], trachea[1], 8.0)]
    vessels = []
    for lung in lungs:
        hilum = np.array([lung["c"][0] * 0.45, 0.0, hilum_z])
        main = hilum + np.array([np.sign(lung["c"][0]) * 20, -5, -10])
        airways.append((trachea[1], main, 5.5))
        for _ in range(cohort.vessels_per_lung):
            _grow_vessel(rng, hilum, lung, 4.0, 3, vessels)
    return {
        "body": body,
        "lungs": lungs,
        "airways": airways,
        "vessels": vessels,
        "fissures": [_fissure(rng, lung) for lung in lungs],
    }


def _fissure(rng: np.random.Generator, lung: dict) -> tuple[np.ndarray, np.ndarray]:
    """A major fissure: a plane (point, unit normal) through the lung, running from posterior and
    superior (+y, +z in LPS) to anterior and inferior, 40-60 degrees from the axial plane."""
    tilt = np.deg2rad(rng.uniform(40, 60))
    normal = np.array([rng.uniform(-0.15, 0.15), np.cos(tilt), -np.sin(tilt)])
    normal /= np.linalg.norm(normal)
    return lung["c"] + normal * rng.uniform(-10, 10), normal


def _grow_vessel(rng, start, lung, radius, depth, out) -> None:
    """A branching vessel: random segments from the hilum toward the lung periphery.

    Each segment tapers (radius ``r`` to ``0.7 r``) and its two branches start at the radius it
    ends with, so a bifurcation is smooth; terminal branches narrow to ``0.3 r``. A tube of constant
    radius would end in a blunt cap and leave a ball at every branching point, nodule-shaped
    artefacts that real vessel trees do not have.
    """
    direction = lung["c"] + rng.normal(0, 1, 3) * lung["r"] * 0.6 - start
    direction /= np.linalg.norm(direction)
    length = rng.uniform(25, 45)
    end = start + direction * length
    out.append((start, end, (radius, radius * (0.7 if depth > 1 else 0.3))))
    if depth > 1:
        for _ in range(2):
            _grow_vessel(rng, end, lung, radius * 0.7, depth - 1, out)


def render(
    case: SyntheticCase, rng: np.random.Generator, cohort: Cohort, slab: int | None = None
) -> np.ndarray:
    """Analytic phantom in HU on the case's voxel grid (numpy [k, j, i] order), float32.

    Painted ``slab`` slices at a time (with the blur's reach of neighbours on each side), so the
    working memory is a few copies of a slab besides the volume and the lung texture; the random
    stream is drawn in the order a whole-volume pass draws it, so the volume does not depend on
    ``slab`` (default :data:`SLAB_SLICES`).
    """
    n, slab = case.shape_kji[0], slab or SLAB_SLICES
    texture = _lung_texture(rng, case.shape_kji, slab)
    scale = texture.std() + 1e-6
    shades = [nodule_shades(nod, rng) for nod in case.nodules]
    reach = int(4.0 * cohort.blur_voxels + 0.5)  # scipy's Gaussian kernel radius (truncate 4)
    hu = np.empty(case.shape_kji, dtype=np.float32)
    for first in range(0, n, slab):
        stop = min(first + slab, n)
        lo, hi = max(first - reach, 0), min(stop + reach, n)
        part = _paint_slab(case, cohort, (lo, hi), texture[lo:hi], scale, shades)
        # Partial-volume blur along the real voxel grid, then scanner noise.
        part = ndimage.gaussian_filter(part, sigma=cohort.blur_voxels)[first - lo : stop - lo]
        part += rng.normal(0, cohort.noise_hu, part.shape).astype(np.float32)
        hu[first:stop] = np.clip(part, -1024, 3071)
    return hu


def _lung_texture(rng: np.random.Generator, shape_kji: tuple, slab: int) -> np.ndarray:
    """Smooth unit noise for the lung parenchyma, float32, drawn ``slab`` slices at a time."""
    noise = np.empty(shape_kji, dtype=np.float32)
    for first in range(0, shape_kji[0], slab):
        part = noise[first : first + slab]
        part[...] = rng.normal(0, 1, part.shape)
    return ndimage.gaussian_filter(noise, 1.5, output=noise)


def _paint_slab(
    case: SyntheticCase,
    cohort: Cohort,
    slices: tuple[int, int],
    texture: np.ndarray,
    scale: float,
    shades: list,
) -> np.ndarray:
    """The sharp phantom (before blur and noise) of slices ``first <= k < stop``; ``texture`` is
    the lung texture of those slices, ``scale`` what makes the whole texture unit."""
    first = slices[0]
    xyz = world_grid(case.shape_kji, case.geometry, slices).astype(np.float32)
    body, lungs = case.anatomy["body"], case.anatomy["lungs"]
    x, y = xyz[..., 0], xyz[..., 1] - body["cy"]
    ell = (x / body["a"]) ** 2 + (y / body["b"]) ** 2
    hu = np.full(xyz.shape[:3], -1000.0, dtype=np.float32)
    hu[ell <= 1.0] = -90.0  # subcutaneous fat
    hu[ell <= 0.85] = 45.0  # muscle and mediastinum
    spine = (x / 18) ** 2 + ((y - body["b"] * 0.7) / 16) ** 2 <= 1
    hu[spine] = 650.0
    each = [np.sum(((xyz - lung["c"]) / lung["r"]) ** 2, axis=-1) <= 1 for lung in lungs]
    in_lung = each[0] | each[1]
    hu[in_lung] = -850.0 + 25.0 * texture[in_lung] / scale
    geom = case.geometry
    for lung_mask, fissure in zip(each, case.anatomy["fissures"]):
        _paint_fissure(hu, xyz, geom, lung_mask, fissure, cohort.fissure_hu)
    for a, b, r in case.anatomy["vessels"]:
        paint_tube(hu, xyz, geom, a, b, r, 40.0, in_lung, first)
    for a, b, r in case.anatomy["airways"]:
        paint_tube(hu, xyz, geom, a, b, r + AIRWAY_WALL_MM, 20.0, None, first)  # wall
        paint_tube(hu, xyz, geom, a, b, r, -1000.0, None, first)  # lumen
    for nod, shade in zip(case.nodules, shades):
        paint_nodule(hu, xyz, geom, nod, in_lung, shade, first)
    return hu


def _paint_fissure(hu, xyz, geom: Geometry, lung: np.ndarray, fissure: tuple, value: float) -> None:
    """Raise the voxels of ``lung`` that the fissure plane crosses to ``value`` (HU).

    The sheet is as thick as a voxel measured along the plane's normal, so it has no holes on an
    anisotropic or oblique grid: a 1 mm pleural line seen through partial volume.
    """
    point, normal = fissure
    across = np.abs(geom.direction.T @ normal) @ geom.spacing  # voxel extent along the normal
    signed = (xyz[lung] - point.astype(np.float32)) @ normal.astype(np.float32)
    values = hu[lung]
    sheet = np.abs(signed) <= across / 2
    values[sheet] = np.maximum(values[sheet], value)
    hu[lung] = values


def make_case(seed: int, index: int, cohort: Cohort) -> SyntheticCase:
    """Draw patient ``index`` (identity, geometry, anatomy, nodules) and render its volume."""
    rng = np.random.default_rng([seed, index])
    phi = make_phi(rng, index)
    geom, shape = make_geometry(rng, cohort)
    centre = index_to_world((np.array(shape[::-1]) - 1) / 2, geom)
    anatomy = make_anatomy(rng, float(centre[2]), cohort)
    nodules = make_nodules(rng, anatomy, cohort)
    case = SyntheticCase(index, phi, geom, shape, nodules, anatomy)
    case.hu = render(case, rng, cohort) + cohort.hu_offset
    case.kernel = cohort.kernel
    return case


def _uid(seed: int, *parts: object) -> str:
    return generate_uid(prefix=UID_ROOT, entropy_srcs=[str(seed), *map(str, parts)])


def write_study(case: SyntheticCase, out_dir: Path, seed: int) -> tuple[str, list[Path]]:
    """Write one CT series, one file per slice; return the SeriesInstanceUID and the files."""
    phi, geom, hu = case.phi, case.geometry, case.hu
    uids = {k: _uid(seed, case.index, k) for k in ("study", "series", "frame")}
    base = phi_dataset(phi, uids)
    signed = case.index % 2 == 0  # half the cohort signed HU, half unsigned with intercept -1024
    intercept = 0.0 if signed else -1024.0
    study_dir = out_dir / f"{phi['last']}_{phi['first']}_{phi['PatientID']}"
    study_dir.mkdir(parents=True, exist_ok=True)
    row_dir, col_dir = geom.direction[:, 0], geom.direction[:, 1]
    files = []
    for k in range(case.shape_kji[0]):
        ds = Dataset()
        ds.update(base)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = _uid(seed, case.index, "sop", k)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
        ds.FrameOfReferenceUID = uids["frame"]
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 3, k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.BurnedInAnnotation = "NO"
        # What a conformant scanner writes besides: the body part, which tells a reader that the
        # series has no laterality (the chest is not a paired part, so Laterality is absent), and
        # the Type 2 elements of Frame of Reference and CT Image (present, empty where unknown).
        ds.BodyPartExamined = "CHEST"
        ds.PositionReferenceIndicator = ""
        ds.AcquisitionNumber = 1
        ds.PatientPosition = "FFS"
        ds.ImagePositionPatient = [f"{v:.4f}" for v in index_to_world([0, 0, k], geom)]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [f"{geom.spacing[1]:.6f}", f"{geom.spacing[0]:.6f}"]
        ds.SliceThickness = f"{geom.spacing[2]:.4f}"
        ds.KVP, ds.XRayTubeCurrent = "120", 80
        if case.kernel:
            ds.ConvolutionKernel = case.kernel
        ds.Rows, ds.Columns = case.shape_kji[1], case.shape_kji[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1 if signed else 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = f"{intercept:g}", "1", "HU"
        ds.WindowCenter, ds.WindowWidth = "-600", "1500"
        stored = np.round(hu[k] - intercept).astype(np.int16 if signed else np.uint16)
        ds.PixelData = stored.tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = (
            CTImageStorage,
            ds.SOPInstanceUID,
        )
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = UID_ROOT + "1"
        ds.file_meta = meta
        path = study_dir / f"IM{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return uids["series"], files


def annotation_rows(
    series_uid: str, nodules: list[Nodule], ratings: np.ndarray | None = None
) -> list[dict]:
    """``annotations.csv`` rows for one series: LUNA16's columns (world mm), the nodule's kinds
    and, when given, the readers' malignancy ratings (``[nodules, readers]``,
    :mod:`ctpipe.synth_ratings`)."""
    rows = []
    for i, n in enumerate(nodules):
        row = {
            "seriesuid": series_uid,
            "coordX": n.centre_xyz[0],
            "coordY": n.centre_xyz[1],
            "coordZ": n.centre_xyz[2],
            "diameter_mm": n.diameter_mm,
            "type": n.kind,
            "texture": n.texture,
            "margin": n.margin,
            "solid_fraction": n.solid_fraction,
        }
        if ratings is not None:
            row.update(zip(synth_ratings.COLUMNS, (int(r) for r in ratings[i])))
        rows.append(row)
    return rows


def write_case(out_dir: Path, seed: int, index: int, cohort: Cohort) -> list[dict]:
    """Generate and write patient ``index``; return its annotation rows (with the readers'
    ratings, drawn from a stream of their own). Picklable for a pool."""
    case = make_case(seed, index, cohort)
    series_uid, _ = write_study(case, Path(out_dir), seed)
    ratings = synth_ratings.rate_nodules(case.nodules, synth_ratings.rating_rng(seed, index))
    return annotation_rows(series_uid, case.nodules, ratings)


def annotations_frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=COLUMNS)
