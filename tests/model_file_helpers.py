"""Objects that act when a model file holding them is loaded: the payloads of tests/models/test_model_loading.py.

Each leaves a marker file behind, so a test can tell whether loading ran code stored in the model.
Both live in an importable module (skops and pickle refer to classes by module and name).
"""

from __future__ import annotations

import os
from pathlib import Path


class RunsCommand:
    """Pickles as a call to os.system: unpickling it runs `command` (the classic pickle payload)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class WritesMarker:
    """A skops payload: skops restores it through `__setstate__`, which writes the marker file."""

    def __init__(self, marker: str | os.PathLike):
        self.marker = str(marker)

    def __setstate__(self, state: dict) -> None:
        Path(state["marker"]).write_text("code from the model file ran\n")
        self.__dict__.update(state)
