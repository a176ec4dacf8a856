"""Synthetic data for the default model family: :mod:`jointcore.data.world`, a procedural RGB-D world.

Names of :mod:`jointcore.data.world` are re-exported lazily (so ``python -m jointcore.data.world`` does
not import the module twice): ``from jointcore.data import render_seeds, caption, PALETTE``.
"""
from __future__ import annotations

import importlib


def __getattr__(name: str):
    world = importlib.import_module(".world", __name__)
    if name in world.__all__:
        return getattr(world, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(importlib.import_module(".world", __name__).__all__))
