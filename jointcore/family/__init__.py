"""The pack's default model family: trained here, on the procedural RGBD world, by one command.

``python -m jointcore.family.build`` runs the stages in order, each cached (``JD_CACHE``/family/…) so
they can run in separate sittings; :mod:`jointcore.family.assemble` writes the files ComfyUI and diffusers
load.
"""
