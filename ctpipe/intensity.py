"""CT intensities as the network sees them.

Small and free of heavy imports: preprocess and the exported package both use it.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def normalise(hu: np.ndarray, norm: dict[str, Any]) -> np.ndarray:
    """The network's input: HU clipped to ``norm["clip"]``, less ``mean``, over ``std`` (float32)."""
    lo, hi = norm["clip"]
    return ((np.clip(hu, lo, hi) - norm["mean"]) / max(norm["std"], 1e-6)).astype(np.float32)
