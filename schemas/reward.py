"""The BaRP reward: the one formula every part of routeloop scores with.

    r = w_q * q - w_c * min(c / tau, 1)

>>> round(reward(1.0, 0.005, 0.8, 0.01), 6)
0.7
"""

from __future__ import annotations

import numpy as np


def reward(quality, cost_usd, w_quality, tau):
    """BaRP reward for quality in [0, 1] and cost in USD; works on scalars and numpy arrays.

    ``w_quality`` is the preference's quality weight (the cost weight is ``1 - w_quality``:
    preferences live on the simplex); ``tau`` is the cost cap in USD.
    """
    penalty = np.minimum(np.asarray(cost_usd, dtype=np.float64) / tau, 1.0)
    value = w_quality * np.asarray(quality, dtype=np.float64) - (1.0 - w_quality) * penalty
    return float(value) if np.ndim(value) == 0 else value
