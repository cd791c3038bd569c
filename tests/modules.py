"""The one way tests load a file that is not part of a package (scripts/*.py, configs/*.py)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_module(path: Path | str) -> ModuleType:
    """Execute the Python file `path` (relative to the repository, or absolute) as a module named
    after its stem, registered in sys.modules (dataclasses resolve annotations through it), as
    `python path` or ml_collections' config_flags would load it."""
    path = REPO / path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module
