"""Joint RGB+Depth Diffusion — a ComfyUI node pack (JointNet, SyncDiffusion, trailing-DDIM predictors,
Diff-2-in-1, MT-Diffusion, RGBD→mesh). Importing it registers nodes only; it changes no ComfyUI global."""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
