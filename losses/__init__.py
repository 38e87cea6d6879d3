"""Loss terms and image metrics for image-to-image models (pure torch; N×C×H×W batches).

Loss terms (differentiable, device/dtype agnostic, shape-checked without host syncs):
:func:`mse_loss`, :func:`l1_loss`, :func:`charbonnier_loss`, :func:`gradient_loss`,
:class:`PerceptualLoss`, :func:`intensity_weighted_loss`, :func:`diffusion_loss`; per-pixel
weight maps :func:`intensity_weights` and :func:`solidification_weights`; their weighted sum with
warm-up :class:`WeightedLoss`. Validation metrics live in :mod:`losses.metrics`.
"""

from losstune.losses.combined import WeightedLoss
from losstune.losses.diffusion import diffusion_loss
from losstune.losses.gradient import gradient_loss, image_gradients
from losstune.losses.intensity import intensity_weighted_loss, intensity_weights
from losstune.losses.perceptual import PerceptualLoss, RandomFeatureExtractor
from losstune.losses.pixel import charbonnier_loss, l1_loss, mse_loss
from losstune.losses.weighting import solidification_weights

__all__ = [
    "PerceptualLoss",
    "RandomFeatureExtractor",
    "WeightedLoss",
    "charbonnier_loss",
    "diffusion_loss",
    "gradient_loss",
    "image_gradients",
    "intensity_weighted_loss",
    "intensity_weights",
    "l1_loss",
    "mse_loss",
    "solidification_weights",
]
