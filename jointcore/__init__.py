"""jointcore — pure PyTorch/diffusers library behind the Joint RGB+Depth Diffusion node pack.

Never imports ``comfy``: every algorithm lives here once and is tested here; ``nodes/`` only converts
ComfyUI types to these calls.
"""
__version__ = "0.1.0"
