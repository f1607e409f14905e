"""The preprocessed dataset on disk, and the 2.5D patch sampler that feeds training.

Layout written by the preprocess stage (``data/processed/``)::

    index.json               one entry per case: case_id, seriesuid, split, shape, geometry, ...,
                             sex, age_band, scanner, slice_thickness_mm (null: unknown)
    cases/<case_id>.image.b2nd  normalised intensities, float16, [k, j, i]
    cases/<case_id>.label.b2nd  nodule mask, uint8, [k, j, i]
    nodules.csv              annotations per case (world mm; the nodule kinds type, texture,
                             margin, solid_fraction where known), with ``inside`` and ``voxels``
    plan.json                dataset fingerprint and the preprocessing plan derived from it
    splits.json              case ids per split (train / val / test)

One file pair per case (not per slice): DVC hashes a few dozen files quickly. The volumes are
chunked, compressed Blosc2 arrays (:func:`ctpipe.volumes.open_volume`), so the sampler
decompresses only the chunks a patch touches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.data import ThreadDataLoader
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandFlip,
    RandGaussianNoise,
    RandRotate90,
    RandScaleIntensity,
    RandShiftIntensity,
)
from scipy import ndimage

from ctpipe.fileio import read_json
from ctpipe.geometry import Geometry
from ctpipe.model.views import (
    VIEWS,
    check_views,
    intensity_level,
    lung_mask,
)
from ctpipe.volumes import case_files, open_volume


def load_index(processed: str | Path) -> dict[str, Any]:
    return read_json(Path(processed) / "index.json")


def load_plan(processed: str | Path) -> dict[str, Any]:
    return read_json(Path(processed) / "plan.json")


def load_nodules(processed: str | Path) -> pd.DataFrame:
    return pd.read_csv(Path(processed) / "nodules.csv")


def cases_in(index: dict[str, Any], split: str) -> list[dict[str, Any]]:
    """The index entries of one split, in index order."""
    return [c for c in index["cases"] if c["split"] == split]


def split_cases(processed: Path, split: str) -> tuple[list[dict[str, Any]], pd.DataFrame]:
    """The cases of one split (index entries, in index order) and their nodules (``nodules.csv``
    rows of those series, renumbered from 0).

    Raises:
        ValueError: the split has no case, naming the index file.
    """
    cases = cases_in(load_index(processed), split)
    if not cases:
        raise ValueError(f"{Path(processed) / 'index.json'}: the {split} split is empty")
    nodules = load_nodules(processed)
    uids = [c["seriesuid"] for c in cases]
    return cases, nodules[nodules["seriesuid"].isin(uids)].reset_index(drop=True)


def load_case(processed: str | Path, case_id: str) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """Image (float16), label (uint8) and geometry of one preprocessed case, decompressed."""
    image, label = (open_volume(f)[:] for f in case_files(processed, case_id))
    entry = next(c for c in load_index(processed)["cases"] if c["case_id"] == case_id)
    return image, label, Geometry.from_dict(entry["geometry"])


def spatial_augmentations() -> Compose:
    """MONAI random in-plane flips and 90-degree turns, applied to image and label together."""
    return Compose(
        [
            RandFlip(prob=0.5, spatial_axis=0),
            RandFlip(prob=0.5, spatial_axis=1),
            RandRotate90(prob=0.5, max_k=3, spatial_axes=(0, 1)),
        ]
    )


def intensity_augmentations() -> Compose:
    """MONAI random intensity jitter and noise, applied to the image only."""
    return Compose(
        [
            RandScaleIntensity(factors=0.1, prob=0.5, channel_wise=False),
            RandShiftIntensity(offsets=0.1, prob=0.5),
            RandAdjustContrast(gamma=(0.8, 1.25), prob=0.2, invert_image=False, retain_stats=True),
            RandGaussianNoise(prob=0.2, std=0.05),
        ]
    )


class SlabPatchDataset(torch.utils.data.Dataset):
    """Random 2.5D patches: ``image [2c+1, P, P]`` and the centre slice's ``label [P, P]``.

    With several ``views`` (:data:`ctpipe.model.views.VIEWS`) each patch is sliced along one of them,
    drawn per item, so one network learns to read axial, coronal and sagittal slabs.

    Every item is a pure function of ``(seed, epoch, item index)``, so a run resumed mid-training
    sees exactly the batches an uninterrupted run would, whatever the number of loader workers.
    A fraction ``fg_fraction`` of the patches is centred on a nodule voxel (nnU-Net oversamples a
    third), uniformly over the nodules; ``hard_fraction`` on bright lung structures that are not
    nodules (:func:`lung_structures`); the rest anywhere in the volume, which shows the network the
    vessels and airways it must learn to ignore. Augmentation: in-plane flips and quarter turns,
    intensity jitter and noise (MONAI), drawn from one generator per item.
    """

    def __init__(
        self,
        processed: str | Path,
        case_ids: list[str],
        patch_size: int,
        context: int,
        samples_per_epoch: int,
        fg_fraction: float,
        seed: int,
        augment: bool = True,
        views=("axial",),
        hard_fraction: float = 0.0,
    ) -> None:
        # Each item opens its case's files and decompresses only the box its patch needs: nothing
        # of a volume stays in memory between items, so memory does not grow with the cases.
        self.files = [case_files(processed, c) for c in case_ids]
        self.views = check_views(views)
        self.shapes: list[tuple[int, ...]] = []
        self.pad: list[float] = []
        # Foreground oversampling draws a nodule (connected component) uniformly, then a voxel in
        # it, so small and part-solid nodules are seen as often as large ones. Voxel indices are
        # kept as int16 (a quarter of argwhere's int64): they are the bulk of what stays per case.
        self.nodules: list[tuple[int, np.ndarray]] = []
        self.hard_fraction = float(hard_fraction)
        self.hard: list[tuple[int, np.ndarray]] = []
        plan = load_plan(processed) if self.hard_fraction > 0 else None
        for case in range(len(case_ids)):
            img, lbl = self.arrays(case)
            if max(img.shape) > np.iinfo(np.int16).max:
                raise ValueError(f"{self.files[case][0]}: shape {img.shape} too large to sample")
            self.shapes.append(img.shape)
            self.pad.append(float(img[0].min()))
            lbl = lbl[:]
            components, n = ndimage.label(lbl > 0)
            voxels = np.argwhere(components > 0).astype(np.int16)
            ids = components[tuple(voxels.T)]
            self.nodules += [(case, voxels[ids == c]) for c in range(1, n + 1)]
            if plan is not None:
                voxels = lung_structures(np.asarray(img[:], np.float32), lbl, plan)
                if len(voxels):
                    self.hard.append((case, voxels.astype(np.int16)))
            del img, lbl, components
        self.patch, self.context = int(patch_size), int(context)
        self.n, self.fg_fraction, self.seed = int(samples_per_epoch), float(fg_fraction), int(seed)
        self.epoch = 0
        self.augment = augment
        self.spatial, self.intensity = spatial_augmentations(), intensity_augmentations()

    def arrays(self, case: int):
        """Image and label of case ``case``, opened, not decompressed (Blosc2 arrays)."""
        return tuple(open_volume(f) for f in self.files[case])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def _centre(self, rng: np.random.Generator) -> tuple[int, np.ndarray]:
        draw = rng.random()
        if self.nodules and draw < self.fg_fraction:
            case, voxels = self.nodules[int(rng.integers(len(self.nodules)))]
            return case, voxels[int(rng.integers(len(voxels)))]
        if self.hard and draw < self.fg_fraction + self.hard_fraction:
            case, voxels = self.hard[int(rng.integers(len(self.hard)))]
            return case, voxels[int(rng.integers(len(voxels)))]
        case = int(rng.integers(len(self.shapes)))
        shape = self.shapes[case]
        return case, np.array([rng.integers(0, s) for s in shape])

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, int(item)])
        case, centre = self._centre(rng)
        image, label = self.arrays(case)
        # The slab is taken along one of the views, drawn per item (no draw with a single view).
        view = (
            self.views[int(rng.integers(len(self.views)))] if len(self.views) > 1 else self.views[0]
        )
        if view != "axial":
            centre = np.asarray(centre)[list(VIEWS[view])]
        k, j, i = (int(c) for c in centre)
        half = self.patch // 2
        # Jitter the centre so the nodule is not always in the middle of the patch.
        j0 = int(j) - half + int(rng.integers(-half // 2, half // 2 + 1))
        i0 = int(i) - half + int(rng.integers(-half // 2, half // 2 + 1))
        img = read_slab(image, view, k, self.context, j0, i0, self.patch, self.pad[case])
        lbl = read_slab(label, view, k, 0, j0, i0, self.patch, 0)
        if self.augment:
            # One RandomState per item, shared by every transform: as reproducible as seeding each
            # transform, at a tenth of the cost (Compose.set_random_state builds one per child).
            state = np.random.RandomState(int(rng.integers(2**31)))
            for t in (*self.spatial.transforms, *self.intensity.transforms):
                t.set_random_state(state=state)
            # Flips and turns are exact on integer labels, so both travel through one transform.
            both = np.asarray(self.spatial(np.concatenate([img, lbl.astype(np.float32)])))
            img = np.asarray(self.intensity(both[:-1]))
            lbl = both[-1:]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)),
            "label": torch.from_numpy(np.ascontiguousarray(lbl, dtype=np.int64)),
        }


def lung_structures(image: np.ndarray, label: np.ndarray, plan: dict) -> np.ndarray:
    """Voxels ``[n, 3]`` of bright structures inside the lungs that are not nodules: vessels and
    airway walls, where a network's false positives come from.

    Bright: above the plan's ``body_threshold_hu`` (-500 HU by default); inside the lungs: more
    than half of the voxels within one slice and three rows and columns are lung (at or below that
    level, within the body, the body being each slice's bright tissue with its holes filled), which
    leaves the pleura and the chest wall out; not within two voxels of a nodule voxel.
    ``image`` is normalised as the plan says (``normalization``: ``mean`` and ``std`` in HU).
    """
    level = intensity_level(plan["body_threshold_hu"], plan["normalization"])
    bright = image > level
    lung = lung_mask(image, level)
    near_lung = ndimage.uniform_filter(lung.astype(np.float32), size=(3, 7, 7)) > 0.5
    near_nodule = ndimage.binary_dilation(label > 0, iterations=2)
    return np.argwhere(bright & near_lung & ~near_nodule)


def read_slab(
    volume, view: str, k: int, context: int, j0: int, i0: int, size: int, pad_value: float
) -> np.ndarray:
    """Slices ``k - context .. k + context`` of ``volume`` seen along ``view`` (indices clipped to the
    volume, the edge slice repeated), cropped to ``[j0:j0+size, i0:i0+size]`` in the view's rows and
    columns and padded with ``pad_value`` outside: ``crop2d(in_view(volume, view)[ks], ...)``, read
    from the one box of ``volume`` it covers, so a compressed volume decompresses only that box.
    ``volume`` is anything sliced like a NumPy array (a Blosc2 array, a memory map).
    """
    axes = VIEWS[view]
    shape = [volume.shape[a] for a in axes]
    ks = np.clip(np.arange(k - context, k + context + 1), 0, shape[0] - 1)
    lo = [int(ks[0]), min(max(j0, 0), shape[1]), min(max(i0, 0), shape[2])]
    hi = [
        int(ks[-1]) + 1,
        max(min(j0 + size, shape[1]), lo[1]),
        max(min(i0 + size, shape[2]), lo[2]),
    ]
    box = [slice(0, 0)] * 3
    for axis, a, b in zip(axes, lo, hi):
        box[axis] = slice(a, b)
    part = np.asarray(volume[tuple(box)]).transpose(axes)
    dtype = np.float32 if np.issubdtype(part.dtype, np.floating) else part.dtype
    return crop2d(part[ks - lo[0]].astype(dtype), j0 - lo[1], i0 - lo[2], size, pad_value)


def crop2d(
    arr: np.ndarray, j0: int, i0: int, size: int | tuple[int, int], pad_value: float
) -> np.ndarray:
    """Crop ``arr[:, j0:j0+h, i0:i0+w]`` (``size`` = h = w, or ``(h, w)``), padding with
    ``pad_value`` where the window reaches outside the array."""
    size_h, size_w = (size, size) if isinstance(size, int) else size
    out = np.full((arr.shape[0], size_h, size_w), pad_value, dtype=arr.dtype)
    h, w = arr.shape[1:]
    sj, si = max(j0, 0), max(i0, 0)
    ej, ei = min(j0 + size_h, h), min(i0 + size_w, w)
    if ej > sj and ei > si:
        out[:, sj - j0 : ej - j0, si - i0 : ei - i0] = arr[:, sj:ej, si:ei]
    return out


def make_loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    workers: int,
    sampler: torch.utils.data.Sampler | None = None,
    pin_memory: bool = False,
):
    """The training loader: worker processes, or with ``workers == 0`` MONAI's ThreadDataLoader,
    which prepares the next batches in a background thread while the network computes (torch
    releases the GIL); the batch order is the same either way."""
    if workers == 0:
        return ThreadDataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=0,
            drop_last=True,
            pin_memory=pin_memory,
            buffer_size=2,
        )
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=True,
        pin_memory=pin_memory,
        persistent_workers=True,
    )
