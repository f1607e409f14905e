"""Malignancy ratings of the synthetic cohort: four readers rate each nodule 1-5, as LIDC-IDRI's do.

LUNA16's ``annotations.csv`` carries no malignancy; LIDC-IDRI's XML does, as up to four readers'
ratings from 1 (highly unlikely) to 5 (highly suspicious). The synthetic cohort draws such ratings
from a latent suspicion per nodule (sources and calibration in ``docs/data.md#malignancy``)::

    z = size * log2(diameter / 8 mm)
        + morphology * (brock_spiculated [spiculated] + brock_part_solid [part solid]
                        + brock_ground_glass [ground glass])
        + lobulated [lobulated] + perifissural [perifissural] + N(0, nodule_sd)

- the log-odds of Brock's full model (McWilliams et al., NEJM 2013) order spiculation, part-solid
  and pure ground-glass texture; ``morphology`` scales them up, since readers weigh morphology
  more than an outcome model does (with the rated features LIDC's malignancy rating is predicted
  with AUC 0.932, 0.949 with size too: Hancock and Magnan, J Med Imaging 2016);
- perifissural nodules are intrapulmonary lymph nodes in practice (none malignant in NELSON's:
  de Hoop et al., Radiology 2012), so they lower it;
- the nodule term is what the readers see that the generator does not draw.

Reader ``r`` rates ``1 + #(cuts below z + bias_r + N(0, reader_sd))``. A nodule counts as malignant
when its mean rating is above 3 (:func:`ctpipe.malignancy.label`). The defaults are calibrated so
that on the default cohort's nodule mix the diameter alone ranks the label with AUC about 0.89
(the diameter-only baseline of Deep Learning with PyTorch on LUNA16 reaches 0.90), the drawn
features without the noise with about 0.95, and about a third of the nodules are malignant.

The ratings use a random stream of their own (:func:`rating_rng`), so adding them changed no image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ctpipe.annotations import RATINGS as COLUMNS  # annotations.csv, one column per reader

if TYPE_CHECKING:
    from ctpipe.synth_nodules import Nodule

READERS = len(COLUMNS)
STREAM = 0x4D414C  # the ratings' own random stream (after the seed and the patient index)


@dataclass(frozen=True)
class RatingModel:
    """The latent suspicion and the readers (module docstring)."""

    size: float = 1.2  # per doubling of the diameter
    reference_mm: float = 8.0
    morphology: float = 1.5  # scale of Brock's log-odds below
    brock_spiculated: float = 0.7729
    brock_part_solid: float = 0.377
    brock_ground_glass: float = -0.1276
    lobulated: float = 0.9
    perifissural: float = -2.0
    nodule_sd: float = 0.5
    reader_sd: float = 0.8
    reader_bias: tuple[float, ...] = (-0.25, -0.1, 0.1, 0.25)
    cuts: tuple[float, ...] = (-1.0, 0.3, 1.7, 3.0)  # rating k + 2 above cuts[k]

    def suspicion(
        self, diameter_mm: np.ndarray, kind: np.ndarray, texture: np.ndarray, margin: np.ndarray
    ) -> np.ndarray:
        """The latent suspicion without its noise, per nodule."""
        morph = (
            self.brock_spiculated * (margin == "spiculated")
            + self.brock_part_solid * (texture == "part_solid")
            + self.brock_ground_glass * (texture == "ground_glass")
        )
        return (
            self.size * np.log2(np.asarray(diameter_mm, dtype=np.float64) / self.reference_mm)
            + self.morphology * morph
            + self.lobulated * (margin == "lobulated")
            + self.perifissural * (kind == "perifissural")
        )

    def rate(self, suspicion: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Ratings 1-5, ``[nodules, READERS]``, for latent suspicions without their noise."""
        z = np.asarray(suspicion, dtype=np.float64)
        z = z + rng.normal(0.0, self.nodule_sd, z.shape)
        seen = z[:, None] + np.asarray(self.reader_bias)[None, :]
        seen = seen + rng.normal(0.0, self.reader_sd, seen.shape)
        return 1 + np.searchsorted(np.asarray(self.cuts), seen).astype(int)


def rating_rng(seed: int, index: int) -> np.random.Generator:
    """The ratings' random stream of patient ``index``, apart from the one that draws the image."""
    return np.random.default_rng([seed, index, STREAM])


def rate_nodules(
    nodules: list[Nodule], rng: np.random.Generator, model: RatingModel = RatingModel()
) -> np.ndarray:
    """The readers' ratings of ``nodules``, ``[len(nodules), READERS]``."""
    if not nodules:
        return np.zeros((0, READERS), dtype=int)
    z = model.suspicion(
        np.array([n.diameter_mm for n in nodules]),
        np.array([n.kind for n in nodules]),
        np.array([n.texture for n in nodules]),
        np.array([n.margin for n in nodules]),
    )
    return model.rate(z, rng)
