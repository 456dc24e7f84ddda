"""Sweep -> `cryptobot promote` -> the audit's `strategy_evidence` and the live runner's `load_strategy`, end to end:
real sweeps (the real 5-year file, and the seeded synthetic market), the real promote command, the real audit checks
and the runner's own loader. The failing case is made by the sweep itself (1 % per side in costs), not by editing
numbers."""
import json
import os
import subprocess
import sys

import pytest

from cryptobot import audit as A
from cryptobot.config import Settings
from cryptobot.live import StartupRefused, load_strategy, select_strategy

from market import REAL_5Y
from test_golive_bar import EDGE, candles as golive_candles

MODEL_CHECKS = ["training_data", "model_freshness", "oos_metrics", "oos_backtest", "model_fingerprint", "feature_psi"]


def _cli(args, cwd):
    code = "import sys; from cryptobot.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CRYPTOBOT_", "BINANCE_", "GO_LIVE"))}
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd,
                       env={**env, "CRYPTOBOT_STATE_DIR": str(cwd / "var")}, timeout=300)
    assert p.returncode == 0, p.stderr
    return p


def _sweep_and_promote(tmp_path, data: str, sweep_id: str, fee: str) -> tuple[dict, dict]:
    "(the promoted manifest, the settings `cryptobot promote` told us to set) for a sweep at `fee` % per side."
    _cli(["sweep", "--strategy", "ema_cross", "--grid", "fast=5:50:5", "--grid", "slow=60:240:30", "--data", data,
          "--id", sweep_id, "--sizing", "full", "--fee", fee, "--slippage", "0", "--folds", "4",
          "--scheduler", "inprocess"], tmp_path)
    out = _cli(["promote", sweep_id], tmp_path).stdout
    env = dict(line.strip().split("=", 1) for line in out.splitlines() if line.strip().startswith("CRYPTOBOT_STRATEGY"))
    assert set(env) == {"CRYPTOBOT_STRATEGY", "CRYPTOBOT_STRATEGY_PARAMS"}, out      # what the runner needs, printed
    art = tmp_path / "data" / "strategies" / "ema_cross" / "strategy.json"
    assert f"artifact: {art.relative_to(tmp_path)}" in out, out
    return json.loads(art.read_text()), env


def _settings(tmp_path, env: dict | None = None) -> Settings:
    kw = {"strategy": env["CRYPTOBOT_STRATEGY"], "strategy_params": env["CRYPTOBOT_STRATEGY_PARAMS"]} if env else {}
    return Settings(state_dir=tmp_path / "var", data_dir=tmp_path / "data", reports_dir=tmp_path / "reports", **kw)


def _good(ev: dict) -> bool:
    "The go-live bar, from the manifest's own figures: DSR, PBO, walk-forward and the one holdout score, real data."
    synthetic = any(str(v).startswith("synthetic") for v in ev["sources"].values())
    return (ev["pbo"] is not None and ev["pbo"] <= 0.5 and ev["walk_forward_oos_return"] > 0 and not synthetic
            and min(ev["deflated_sharpe"].values()) >= 0.95 and ev["holdout_return"] is not None
            and ev["holdout_return"] > 0 and ev["holdout_configs_scored"] == 1)


@pytest.mark.parametrize("data", ["real", "synthetic", "edge"])
def test_promoted_sweep_is_judged_by_the_audit_and_loaded_by_the_runner(tmp_path, data):
    if data == "real" and not REAL_5Y.exists():
        pytest.skip(f"real data absent: {REAL_5Y} (../shared/data)")
    src = str(REAL_5Y) if data == "real" else "synthetic"
    if data == "edge":                    # a user's file with a planted trend edge (tests/test_golive_bar.py)
        src = str(tmp_path / "edge.csv")
        golive_candles(3, EDGE).tz_convert(None).to_csv(src)

    # costs of 0.1 % per side: the sweep's chosen configuration, promoted, is what the audit reads
    m, env = _sweep_and_promote(tmp_path, src, "cheap", "0.1")
    ev = m["evidence"]
    s = _settings(tmp_path, env)
    checks = {c.name: c for c in A.run_checks(s, env_files=[], repo_dir=None, ask_exchange=False, backtest=False,
                                                only=["strategy_evidence", *MODEL_CHECKS, "paper_vs_backtest"])}
    c = checks["strategy_evidence"]
    print(f"{data} cheap: {c.status} {c.evidence} -> {c.detail}")
    assert c.status == (A.PASS if _good(ev) else A.FAIL), c
    assert all(str(v).startswith("synthetic" if data == "synthetic" else "real:") for v in ev["sources"].values()), ev
    if data == "synthetic":               # evidence from the synthetic market never passes, whatever its figures
        assert c.status == A.FAIL and "synthetic market" in c.detail, c
    assert "sweep cheap" in c.evidence and f"{ev['configs_tried']} configurations tried" in c.evidence
    assert f"walk-forward OOS return after costs {ev['walk_forward_oos_return']:+.2%}" in c.evidence
    # a rule strategy is not failed for lacking a model; the paper-vs-backtest comparison says it is unverified
    for name in MODEL_CHECKS:
        assert checks[name].status == A.PASS and checks[name].evidence.startswith("n/a: the runner trades the rule"), name
    assert checks["paper_vs_backtest"].status == A.WARN

    # the runner accepts the promoted artifact for the promoted parameters ...
    strat = select_strategy(s)
    art = load_strategy(s, strat)
    assert art.manifest["strategy_fingerprint"] == strat.fingerprint() == m["strategy_fingerprint"]
    # ... and refuses it, in one line, for other parameters
    other = _settings(tmp_path, {**env, "CRYPTOBOT_STRATEGY_PARAMS": "fast=7,slow=77"})
    with pytest.raises(StartupRefused) as e:
        load_strategy(other, select_strategy(other))
    assert "differs in its parameters" in str(e.value) and "\n" not in str(e.value)
    co = A.run_check("strategy_evidence", A.Evidence(other, env_files=[]))
    assert co.status == A.FAIL and "differs in its parameters" in co.evidence

    # 1 % per side (5 % on the planted edge): the same grid loses money out of sample; promote warns, the audit fails it
    m2, env2 = _sweep_and_promote(tmp_path, src, "costly", "5" if data == "edge" else "1.0")   # the edge survives 1 %
    ev2 = m2["evidence"]
    assert not _good(ev2) and m2["evidence_failures"]
    c2 = A.run_check("strategy_evidence", A.Evidence(_settings(tmp_path, env2), env_files=[]))
    print(f"{data} costly: {c2.status} {c2.evidence} -> {c2.detail}")
    assert c2.status == A.FAIL and "sweep costly" in c2.evidence
    assert ("is not positive" in c2.detail) == (ev2["walk_forward_oos_return"] <= 0)
    assert ("overfitting" in c2.detail) == (ev2["pbo"] is None or ev2["pbo"] > 0.5)
    if data == "edge":                    # the planted edge passes at 0.1 % (measured), so both outcomes are exercised
        assert c.status == A.PASS, c
    # the configuration promoted first is no longer in the runner's slot (unless the costly sweep chose the same)
    c1 = A.run_check("strategy_evidence", A.Evidence(s, env_files=[]))
    assert c1.status == A.FAIL

    # the model configured (the default): strategy_evidence defers to the model checks, which still apply
    sm = _settings(tmp_path)
    checks = {c.name: c for c in A.run_checks(sm, env_files=[], repo_dir=None, ask_exchange=False, backtest=False,
                                                only=["strategy_evidence", "training_data", "model_fingerprint"])}
    assert checks["strategy_evidence"].status == A.PASS and "judged by the model checks" in checks["strategy_evidence"].evidence
    assert checks["training_data"].status == A.FAIL and "no model" in checks["training_data"].evidence
    assert checks["model_fingerprint"].status == A.FAIL
