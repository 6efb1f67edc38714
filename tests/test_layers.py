"""The import direction between the package's folders (README "Architecture"), checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "semclip_batch"

# What each part may import from the package (itself always). Top-level modules are parts of their own.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "config": {"errors"},
    "model": set(),
    "io": {"errors", "config"},
    "synth": {"errors", "config", "io"},
    "methods": {"errors", "config", "io", "model"},
    "pipeline": {"errors", "config", "io", "model", "methods"},
    "fewshot": {"errors", "config", "io", "model", "methods", "analysis"},  # metrics fit thresholds
    "analysis": {"errors", "config", "io", "methods"},
    "demo": {"errors", "config", "io", "model", "methods", "pipeline", "fewshot", "analysis", "synth"},
    "cli": {"errors", "config", "io", "model", "methods", "pipeline", "fewshot", "analysis", "synth", "demo"},
}


def part_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_parts(path: Path) -> set[str]:
    """Parts of the package that ``path`` imports (absolute ``semclip_batch.x`` or relative)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    here = path.relative_to(PACKAGE).parts[:-1]
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(here[: len(here) - (node.level - 1)])
                module = [*base, *(node.module.split(".") if node.module else [])]
                names = [".".join(["semclip_batch", *module, a.name]) if not module else ".".join(["semclip_batch", *module])
                         for a in node.names]
            elif node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module == "semclip_batch"]
        for name in names:
            parts = name.split(".")
            if parts[0] == "semclip_batch" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_every_module_belongs_to_a_known_part():
    unknown = {part_of(p) for p in PACKAGE.rglob("*.py") if part_of(p) not in ALLOWED and part_of(p) != "__init__"}
    assert not unknown, f"add these to ALLOWED and the README's architecture section: {sorted(unknown)}"


def test_imports_follow_the_layers():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        part = part_of(path)
        if part == "__init__":
            continue
        bad = imported_parts(path) - ALLOWED[part] - {part}
        wrong += [f"{path.relative_to(PACKAGE)} imports {b}" for b in sorted(bad)]
    assert not wrong, "\n".join(wrong)


def test_model_is_pure_torch():
    for path in (PACKAGE / "model").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level}
        assert not mods & {"ray", "fsspec", "s3fs", "zarr", "pyarrow", "pandas", "requests"}, path
