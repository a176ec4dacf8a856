"""360° depth and normals from a perspective single-step predictor (Marigold, E2E-FT).

* :mod:`.views` — panorama grids (equirectangular, cylindrical), perspective views on the sphere, exact
  resampling between them;
* :mod:`.align` — every view's scale and shift solved jointly over all overlaps (robust least squares);
* :mod:`.merge` — the pipeline (:func:`predict_panorama`) and the compared methods;
* :mod:`.predictors` — a Marigold / E2E-FT predictor as the functions the pipeline calls;
* :mod:`.evaluate` — measurement on the procedural world's 360° scenes (``python -m jointcore.panodepth.evaluate``);
* :mod:`.cli` — folders of panoramas (``python -m jointcore.panodepth``).
"""
from .align import Alignment, common_quantity, solve_alignment, view_coefficients
from .merge import (METHODS, SYNC, PanoPrediction, method_layout, normalised_depth_image, predict_panorama,
                    shared_noise)
from .predictors import predictor_convention, predictor_fns, predictor_view_size
from .views import (KINDS, LAYOUTS, PanoGrid, View, coverage, layout_angles, make_views, pano_to_view, view_on_pano,
                    world_cameras)

__all__ = ["Alignment", "common_quantity", "solve_alignment", "view_coefficients", "METHODS", "SYNC",
           "PanoPrediction", "method_layout", "normalised_depth_image", "predict_panorama", "predictor_convention", "predictor_fns", "predictor_view_size",
           "shared_noise", "KINDS", "LAYOUTS",
           "PanoGrid", "View", "coverage", "world_cameras", "layout_angles", "make_views", "pano_to_view", "view_on_pano"]
