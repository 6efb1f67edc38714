"""A script of ``benchmarks/`` imported as a module, for the tests of its functions (the folder is no package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` loaded once per test session as module ``semclip_bench_<name>``."""
    module_name = f"semclip_bench_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    if str(folder) not in sys.path:  # a script imports its sibling scripts (flops, ...) as run from the folder
        sys.path.append(str(folder))
    path = folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
