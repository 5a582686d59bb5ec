"""The package's shape: imports point inward by layer, no import circles, the README example is the shipped one."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "quantcache"

# Sub-packages, inner first (docs/architecture.md): a module imports only from its own layer or inner ones.
LAYERS: list[set[str]] = [
    {"errors", "progress", "outputs"},
    {"scheme"},
    {"ops"},
    {"state"},
    {"cache"},
    {"models"},
    {"calibration"},
    {"analysis"},
    {"export"},
    {"cli"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
_ROOT_FILES = {"__init__.py", "__main__.py"}  # the lazy public surface and the entry point sit above every layer
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE or p.name not in _ROOT_FILES)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(dotted: str) -> bool:
    relative = Path(*dotted.split(".")[1:]) if "." in dotted else Path()
    return (PACKAGE / relative).with_suffix(".py").is_file() or (PACKAGE / relative / "__init__.py").is_file()


def _type_checking_only(tree: ast.AST) -> set[int]:
    """Line numbers of imports inside ``if TYPE_CHECKING:`` blocks (never run, so never part of the graph)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imported_modules(path: Path) -> set[str]:
    """The quantcache modules ``path`` imports when it runs, deferred imports included (dotted names)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = _type_checking_only(tree)
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "quantcache")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            if base.split(".")[0] != "quantcache":
                continue
            for alias in node.names:  # ``from package import module`` imports the module
                found.add(f"{base}.{alias.name}" if _is_module(f"{base}.{alias.name}") else base)
    return {name for name in found if name != "quantcache"}


def _layer(dotted: str) -> str:
    return dotted.split(".")[1]


@pytest.mark.parametrize("path", MODULES, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_imports_point_inward(path: Path) -> None:
    own = _layer(_module_name(path))
    assert own in RANK, f"{own} is not placed in a layer of tests/test_layout.py (and docs/architecture.md)"
    outward = sorted(name for name in imported_modules(path) if RANK.get(_layer(name), -1) > RANK[own])
    assert not outward, f"{path.relative_to(ROOT)} imports outer modules {outward}"


def test_no_import_circles() -> None:
    graph = {_module_name(path): imported_modules(path) for path in sorted(PACKAGE.rglob("*.py"))}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                circle = [*path[path.index(target) :], target]
                raise AssertionError(f"import circle: {' -> '.join(circle)}")
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_the_layering_check_sees_deferred_and_relative_imports(tmp_path: Path) -> None:
    """The checks above would miss a circle hidden in a function or written relatively: they must not."""
    sample = PACKAGE / "cache" / "kv_quantizer.py"
    found = imported_modules(sample)
    assert "quantcache.cache.layer" in found and "quantcache.cache.cache" not in found  # TYPE_CHECKING only
    text = "from .stream import StreamQuantizer\ndef f():\n    from quantcache.cli import main\n"
    fake = PACKAGE / "cache" / "_layout_probe.py"
    try:
        fake.write_text(text, encoding="utf-8")
        assert imported_modules(fake) == {"quantcache.cache.stream", "quantcache.cli"}
    finally:
        fake.unlink()


def test_public_surface_is_what_users_need() -> None:
    import quantcache

    assert set(quantcache.__all__) == {
        "CacheMode",
        "CalibrationError",
        "ConfigError",
        "KVQuantConfig",
        "KVQuantizer",
        "QuantArgs",
        "QuantDtype",
        "QuantMethod",
        "QuantScope",
        "QuantStateError",
        "QuantcacheError",
        "QuantizedCalibratingCache",
        "__version__",
        "calibrate",
        "evaluate",
        "load_model",
        "use_code_attention",
    }
    for name in quantcache.__all__:
        assert getattr(quantcache, name) is not None
    for internal in ("CACHE_KEYWORD", "attention_module_names", "fake_quantize", "compute_qparams"):
        assert not hasattr(quantcache, internal)


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
