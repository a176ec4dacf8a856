"""Joint RGB+Depth Diffusion — a ComfyUI node pack (JointNet, SyncDiffusion, trailing-DDIM predictors,
Diff-2-in-1, MT-Diffusion, RGBD→mesh). Importing it registers nodes only; it changes no ComfyUI global."""

WEB_DIRECTORY = "./web"

if __package__:  # loaded as a package, as ComfyUI loads custom nodes
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # loaded as a bare module by a tool (e.g. pytest collecting the repository root): nothing to register
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
