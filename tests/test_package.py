"""Package hygiene: every generated module imports, and its `__all__` names only what exists
(a name deleted after `Class.method = fn` once broke `from cryptobot.journal import *`)."""
import importlib
import inspect
from pathlib import Path

import pytest

MODULES = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "cryptobot").glob("*.py")
                 if not p.stem.startswith("_"))


@pytest.mark.parametrize("name", MODULES)
def test_all_names_exist(name):
    mod = importlib.import_module(f"cryptobot.{name}")
    missing = [n for n in getattr(mod, "__all__", []) if not hasattr(mod, n)]
    assert not missing, f"cryptobot.{name}.__all__ names missing attributes: {missing}"


# --- import graph: imports point one way (DESIGN.md), never in a circle ---------------------------------------
import ast

PKG = Path(__file__).resolve().parents[1] / "cryptobot"


def _imported(node, importer: str) -> set[str]:
    "The cryptobot modules one import statement names (`from .x`, `from cryptobot.x`, `from cryptobot import x`, `import cryptobot.x`)."
    if isinstance(node, ast.Import):
        return {a.name.split(".")[1] for a in node.names if a.name.startswith("cryptobot.")}
    if not isinstance(node, ast.ImportFrom):
        return set()
    base = node.module or ""
    if node.level == 1:
        base = "cryptobot" + (f".{base}" if base else "")
    if base == "cryptobot":
        return {a.name for a in node.names if (PKG / f"{a.name}.py").exists()}
    return {base.split(".")[1]} if base.startswith("cryptobot.") else set()


def import_graph(module_level_only: bool = False) -> dict[str, set[str]]:
    "{module: the cryptobot modules it imports}, from the source (module level, and inside functions unless asked not to)."
    g = {}
    for p in sorted(PKG.glob("*.py")):
        if p.stem.startswith("_"):
            continue
        tree = ast.parse(p.read_text(encoding="utf-8"))
        nodes = tree.body if module_level_only else ast.walk(tree)
        g[p.stem] = set().union(*(_imported(n, p.stem) for n in nodes)) - {p.stem}
    return g


def cycles(g: dict[str, set[str]]) -> list[set[str]]:
    "The strongly connected groups of more than one module (Tarjan): each is at least one import cycle."
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = set()
            while True:
                w = stack.pop()
                on.discard(w)
                scc.add(w)
                if w == v:
                    break
            if len(scc) > 1:
                out.append(scc)

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_sees_a_function_local_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert cycles({"a": {"b"}, "b": set()}) == []
    fn_local = ast.parse("def f():\n    from cryptobot.live import run\n    import cryptobot.data\n")
    assert set().union(*(_imported(n, "x") for n in ast.walk(fn_local))) == {"live", "data"}


def test_no_import_cycle_at_module_level():
    assert cycles(import_graph(module_level_only=True)) == []


def test_no_import_cycle_even_through_function_local_imports():
    "Function-local imports count too: a cycle dodged by a local import is still a cycle."
    bad = [sorted(c) for c in cycles(import_graph())]
    assert not bad, f"import cycles among cryptobot modules: {bad}"


RESEARCH_ORDER = ["features", "strategy", "backtest", "model", "sweep"]


def test_research_modules_import_one_way():
    "features -> strategy -> backtest -> model -> sweep: each imports (anywhere in it) only research modules before it."
    g = import_graph()
    bad = {m: sorted(g[m] & set(RESEARCH_ORDER[i + 1:])) for i, m in enumerate(RESEARCH_ORDER)}
    assert not any(bad.values()), f"research modules importing a later one: {bad}"


def _underscored_imports(tree) -> list[tuple[int, str]]:
    """(line, name) for every use of another cryptobot module's underscored name: `from .x import _y` (anywhere), and
    `m._y` where `m` is bound by `import cryptobot.x as m` / `from cryptobot import x as m`."""
    out, aliases = [], set()
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and (n.level == 1 or (n.module or "").split(".")[0] == "cryptobot"):
            pkg_itself = n.module in (None, "cryptobot")
            for a in n.names:
                if pkg_itself and (PKG / f"{a.name}.py").exists():
                    aliases.add(a.asname or a.name)
                elif a.name.startswith("_") and not a.name.startswith("__"):
                    out.append((n.lineno, a.name))
        elif isinstance(n, ast.Import):
            aliases |= {a.asname for a in n.names if a.name.startswith("cryptobot.") and a.asname}
    for n in ast.walk(tree):
        if (isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in aliases
                and n.attr.startswith("_") and not n.attr.startswith("__")):
            out.append((n.lineno, f"{n.value.id}.{n.attr}"))
    return out


def test_the_underscored_name_finder_sees_both_forms():
    src = "from .backtest import _kernel, ok\ndef f():\n    from cryptobot import model as M\n    return M._result, M.fine\n"
    assert _underscored_imports(ast.parse(src)) == [(1, "_kernel"), (4, "M._result")]


def test_no_module_uses_another_modules_underscored_names():
    "A module's underscored names are its own: what others use has a public name (e.g. the backtest kernel's face)."
    bad = [f"{p.name}:{k}: {name}" for p in sorted(PKG.glob("*.py")) if not p.stem.startswith("_")
           for k, name in _underscored_imports(ast.parse(p.read_text(encoding="utf-8")))]
    assert not bad, "\n".join(bad)


def test_verdict_is_imported_by_the_gate_monitor_and_audit_and_imports_none_of_them():
    g = import_graph()
    assert {"live", "monitor", "audit"} & g["verdict"] == set(), g["verdict"]
    assert all("verdict" in g[m] for m in ("live", "monitor", "audit"))
    assert "audit" not in g["live"] and "audit" not in g["monitor"]


def _defs(name: str) -> list[str]:
    "Modules whose top level defines a function `name`."
    return sorted(p.stem for p in PKG.glob("*.py") if p.stem != "_modidx"
                  for n in ast.parse(p.read_text()).body if isinstance(n, ast.FunctionDef) and n.name == name)


def test_one_log_value_and_one_age_formatter():
    "The `key=value` field formatter and the '10 min' / '2.5 h' age text are written once (files), not per module."
    assert _defs("_fmt") == [] and _defs("log_value") == ["files"]
    assert _defs("age_text") == ["files"]
    copies = [p.stem for p in PKG.glob("*.py") if p.stem != "_modidx" and "s / 3600:.1f} h" in p.read_text()]
    assert copies == ["files"], copies


# The emulator's imitation of the exchange's wire error (the real exchange's arrives as a ccxt exception).
NOT_OURS = {"cryptobot.emulator.BinanceError"}


@pytest.mark.parametrize("name", MODULES)
def test_every_exported_error_derives_from_cryptobot_error(name):
    from cryptobot.files import CryptobotError
    mod = importlib.import_module(f"cryptobot.{name}")
    errors = [o for k, o in vars(mod).items() if not k.startswith("_") and isinstance(o, type)
              and issubclass(o, BaseException) and o.__module__ == mod.__name__]
    bad = [e.__name__ for e in errors if not issubclass(e, CryptobotError) and f"{mod.__name__}.{e.__name__}" not in NOT_OURS]
    assert not bad, f"{mod.__name__}: {bad} do not derive from CryptobotError"
    for e in errors:                                # none lost its built-in base or copies the one-line constructor
        assert issubclass(e, Exception)
        init = e.__dict__.get("__init__")
        assert init is None or e is CryptobotError or ".split())" not in inspect.getsource(init), e


def test_every_function_local_import_says_why_it_is_lazy():
    "Imports belong at the top; the few kept inside a function (heavy library off the live path, the known cycle) say why."
    import re
    bare = [f"{p.name}:{k}: {line.strip()}" for p in sorted(PKG.glob("*.py")) if p.stem != "_modidx"
            for k, line in enumerate(p.read_text().splitlines(), 1)
            if re.match(r"\s+(from|import) ", line) and "# lazy: " not in line]
    assert not bare, "\n".join(bare)
