"""A Marigold / E2E-FT :class:`~jointcore.predictor.DepthNormalPredictor` as the functions
:func:`~.merge.predict_panorama` calls, and what its checkpoint says about the views (one place for the node,
the command line and the measurement)."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .views import PanoGrid, auto_view_size


def predictor_convention(model_index: Optional[dict]) -> str:
    """``depth`` or ``disparity``: what a checkpoint's ``model_index.json`` says it predicts."""
    kind = str((model_index or {}).get("prediction_type", "depth")).lower()
    return "disparity" if "disparity" in kind else "depth"


def predictor_view_size(model_index: Optional[dict], grid: PanoGrid, fov_deg: float) -> int:
    """Views at the checkpoint's processing resolution (what it was trained at), else at the panorama's own
    angular resolution."""
    res = (model_index or {}).get("default_processing_resolution")
    return int(res) // 8 * 8 if res else auto_view_size(grid, fov_deg)


def predictor_fns(depth, normals=None, *, device=None, init: str = "zeros", seed: int = 0,
                  on_images: Optional[Callable[[int], None]] = None):
    """``(depth_fn, normals_fn, latent_shape)`` for :func:`~.merge.predict_panorama` from loaded predictors.

    Each view is predicted at its own size (the views are made at the checkpoint's resolution), with the
    checkpoint's default number of steps; ``init`` / ``seed`` start the depth views (``latents`` from a shared
    noise field replace them); ``device``: where the images go; ``on_images(n)`` after every call with ``n``
    views (progress). ``normals_fn`` is ``None`` without a normals predictor.
    """
    def to(images):
        return images if device is None else images.to(device)

    def done(out, images):
        if on_images is not None:
            on_images(images.shape[0])
        return out

    def depth_fn(images: torch.Tensor, latents: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = depth.predict(to(images), "depth", processing_resolution=0, steps=0, init=init, seed=seed,
                            latents=None if latents is None else to(latents)).prediction
        return done(out, images)

    def normals_fn(images: torch.Tensor) -> torch.Tensor:
        return done(normals.predict(to(images), "normals", processing_resolution=0, steps=0).prediction, images)

    def latent_shape(h: int, w: int) -> tuple:
        f = depth.vae_scale_factor
        return (int(depth.vae.config.latent_channels), h // f, w // f)

    return depth_fn, (normals_fn if normals is not None else None), latent_shape
