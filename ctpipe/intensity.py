"""CT intensities: the normalisation the network sees, and the HU the preprocessed dataset keeps.

Small and free of heavy imports: preprocess, the training sampler, the stages that read the
preprocessed dataset and the exported package all use it.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def normalise(hu: np.ndarray, norm: dict[str, Any]) -> np.ndarray:
    """The network's input: HU clipped to ``norm["clip"]``, less ``mean``, over ``std`` (float32)."""
    lo, hi = norm["clip"]
    return ((np.clip(hu, lo, hi) - norm["mean"]) / max(norm["std"], 1e-6)).astype(np.float32)


def stored_hu(hu: np.ndarray, norm: dict[str, Any]) -> np.ndarray:
    """HU as the preprocessed dataset keeps them: clipped to the normalisation's range (nothing
    outside it reaches the network) and rounded to int16. CT is acquired in whole HU; the
    resampling's fractions are far below its noise, and whole numbers compress to about half the
    size of the normalised float16 volume. Readers apply :func:`normalise`."""
    lo, hi = norm["clip"]
    return np.rint(np.clip(hu, max(lo, -32768), min(hi, 32767))).astype(np.int16)
