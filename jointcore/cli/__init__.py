"""Command-line tools of jointcore (``python -m jointcore.cli.<tool> --help``)."""
