"""Class activation maps (ARCHITECTURE §5): tensors in, tensors out; nothing here knows of files or configs.

``CAMEngine`` computes every gradient CAM of every target layer from one forward and one backward pass;
``methods`` holds the formulas (pure functions of activations and gradients), ``perturbation`` the methods
with their own forwards (Score-CAM, Integrated Gradients, SmoothGrad), ``maps`` the map helpers.
"""

from evidrift.cam.engine import CAMEngine, CAMResult, fuse, resolve_layers, resolve_targets
from evidrift.cam.maps import is_degenerate, minmax_normalize, overlay, sum_to_one, upsample
from evidrift.cam.methods import ALIASES, METHODS, resolve_method

__all__ = [
    "ALIASES",
    "METHODS",
    "CAMEngine",
    "CAMResult",
    "fuse",
    "is_degenerate",
    "minmax_normalize",
    "overlay",
    "resolve_layers",
    "resolve_method",
    "resolve_targets",
    "sum_to_one",
    "upsample",
]
