"""``python -m jointcore.panodepth``: depth and normals for a folder of 360° panoramas (:mod:`.cli`)."""
import sys

from .cli import main

sys.exit(main())
