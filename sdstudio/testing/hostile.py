"""Hostile model-file content for tests of safe loading: objects whose unpickling would run code."""

from __future__ import annotations

import os
from pathlib import Path


class SystemCall:
    """Pickled, this asks the unpickler to run ``touch MARKER`` through ``os.system``: a loader that lets it
    through leaves the marker file behind (the sentinel the tests look for)."""

    def __init__(self, marker: str | Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))
