"""Synthetic defects for texture patches, shared by the quality script and the demo-data maker.

Each function takes a uint8 patch [H, W] or [H, W, 3] and a numpy Generator and returns a damaged
copy. The defects are the ones an inspection camera meets:

- scratch: a thin straight line, 1-2 pixels wide, brighter or darker than the surface;
- hole: a dark disc (a missing piece showing the background);
- stain: a disc tinted towards a brownish colour, blended at 60%;
- material: a patch of another texture (passed in) pasted over a quarter of the patch.
"""

import numpy as np


def _grid(shape):
    h, w = shape[:2]
    return np.mgrid[0:h, 0:w]


def scratch(patch, rng):
    out = patch.astype(np.float64)
    rows, cols = _grid(patch.shape)
    angle = rng.uniform(0, np.pi)
    r0, c0 = rng.uniform(8, patch.shape[0] - 8, size=2)
    dist = np.abs((rows - r0) * np.cos(angle) - (cols - c0) * np.sin(angle))
    mask = dist < rng.uniform(0.6, 1.2)
    value = 245.0 if rng.random() < 0.5 else 15.0
    out[mask] = value
    return out.clip(0, 255).astype(np.uint8)


def hole(patch, rng):
    out = patch.copy()
    rows, cols = _grid(patch.shape)
    r0, c0 = rng.uniform(8, patch.shape[0] - 8, size=2)
    mask = (rows - r0) ** 2 + (cols - c0) ** 2 < rng.uniform(3, 5) ** 2
    out[mask] = rng.integers(0, 20)
    return out


def stain(patch, rng):
    out = patch.astype(np.float64)
    rows, cols = _grid(patch.shape)
    r0, c0 = rng.uniform(6, patch.shape[0] - 6, size=2)
    mask = (rows - r0) ** 2 + (cols - c0) ** 2 < rng.uniform(5, 8) ** 2
    tint = np.array([120.0, 80.0, 40.0]) if patch.ndim == 3 else 90.0
    out[mask] = 0.4 * out[mask] + 0.6 * tint
    return out.clip(0, 255).astype(np.uint8)


def material(patch, rng, other):
    """Pastes the top-left quarter-area square of `other` (same shape) at a random place."""
    out = patch.copy()
    h, w = patch.shape[:2]
    s = h // 2
    r0, c0 = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
    out[r0:r0 + s, c0:c0 + s] = other[:s, :s]
    return out


DEFECTS = ("scratch", "hole", "stain", "material")


def damage(kind, patch, rng, other=None):
    if kind == "material":
        return material(patch, rng, other)
    return {"scratch": scratch, "hole": hole, "stain": stain}[kind](patch, rng)
