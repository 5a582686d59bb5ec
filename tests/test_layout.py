"""The package's shape: imports point inward, modules stay small, the README example is the shipped one."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "quantcache"

# Inner layers first; a module may import only from its own layer or inner ones (README, "Layout").
LAYERS: list[set[str]] = [
    {"errors"},
    {"formats", "patterns", "scheme", "config", "presets"},
    {"granularity", "quantization", "rotation", "stream_space", "rounding", "rope", "packing", "accounting"},
    {"observers"},
    {"state_fields"},
    {"serialization"},
    {"quantizer", "layer_quantizer", "growing_storage", "layers", "model_info", "cache_state", "cache"},
    {"calibration", "evaluation", "sensitivity", "bit_allocation", "distributed", "progress", "data", "fetch"}
    | {"models", "report", "queries"},
    {"export", "cli"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _top_module(path: Path) -> str:
    relative = path.relative_to(PACKAGE).with_suffix("")
    return relative.parts[0]


def _package_imports(path: Path) -> set[str]:
    """First-level quantcache modules that ``path`` imports (relative or absolute)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    depth = len(path.relative_to(PACKAGE).parts) - 1  # 0 for a top-level module
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level and node.level - 1 == depth:  # relative import from the package root
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("quantcache."):
                found.add(node.module.split(".")[1])
    return {name for name in found if name in RANK}


_ROOT_FILES = {"__init__.py", "__main__.py"}
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE or p.name not in _ROOT_FILES)


@pytest.mark.parametrize("path", MODULES)
def test_imports_point_inward(path: Path) -> None:
    module = _top_module(path)
    assert module in RANK, f"{module} is not placed in a layer of tests/test_layout.py (and README's Layout)"
    outward = sorted(name for name in _package_imports(path) if RANK[name] > RANK[module])
    assert not outward, f"{path.relative_to(ROOT)} imports outer modules {outward}"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")))
def test_no_module_is_over_460_lines(path: Path) -> None:
    assert len(path.read_text(encoding="utf-8").splitlines()) <= 460


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"## Example\n\n```python\n(.*?)```", text, re.S)
    assert match, "README has an '## Example' section with a python block"
    return match.group(1)


def test_readme_example_is_the_shipped_quickstart() -> None:
    assert _readme_example() == (ROOT / "examples" / "quickstart.py").read_text(encoding="utf-8")


@pytest.mark.slow
def test_readme_example_runs(tmp_path: Path) -> None:
    """The quickstart end to end on SmolLM2 (fetched once): calibrate, save, reload packed, generate."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("The three primary colours are") and len(lines[0]) > len("The three primary colours are")
    packed, plain = (int(n) for n in re.findall(r"\d+", lines[-1])[:2])
    assert 0 < packed < plain / 1.8  # packed INT8 codes against the float32 DynamicCache bytes
    assert (tmp_path / "kv_scales.safetensors").is_file()
