"""The benchmark scripts import against the package as it is: a name they use that moved fails here, not in the
middle of an hour-long measurement."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(path.stem for path in BENCHMARKS.glob("*.py"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_benchmark_script_imports(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    for cached in [module for module in sys.modules if module in SCRIPTS]:
        monkeypatch.delitem(sys.modules, cached)
    module = importlib.import_module(name)
    source = (BENCHMARKS / f"{name}.py").read_text()
    if '__name__ == "__main__"' in source:  # a script, not one of the helpers the scripts share
        assert callable(getattr(module, "main", None)), f"benchmarks/{name}.py runs, but has no main()"


def test_the_scripts_are_all_found() -> None:
    assert {"quality", "speed", "lengths", "answers", "schemes", "peers"} <= set(SCRIPTS)
