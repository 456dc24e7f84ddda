"""Package hygiene: every generated module imports, and its `__all__` names only what exists
(a name deleted after `Class.method = fn` once broke `from cryptobot.journal import *`)."""
import importlib
from pathlib import Path

import pytest

MODULES = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "cryptobot").glob("*.py")
                 if not p.stem.startswith("_"))


@pytest.mark.parametrize("name", MODULES)
def test_all_names_exist(name):
    mod = importlib.import_module(f"cryptobot.{name}")
    missing = [n for n in getattr(mod, "__all__", []) if not hasattr(mod, n)]
    assert not missing, f"cryptobot.{name}.__all__ names missing attributes: {missing}"
