"""Load the project's scripts (``benchmarks/*.py``, ``experiments/*.py``) as modules, so tests
can call their functions without running their command lines."""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(folder: str, name: str) -> ModuleType:
    """``load_script("benchmarks", "training_cost")``: the module of ``<repo>/benchmarks/training_cost.py``.

    The script's folder goes on ``sys.path`` as when it runs, so its sibling imports (``import hygiene``) work.
    """
    folder_path = os.path.join(ROOT, folder)
    if folder_path not in sys.path:
        sys.path.insert(0, folder_path)
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, folder, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
