"""The strategy check (issue 19): look-ahead, warm-up, finite memory, determinism and outputs, found by what a
strategy OUTPUTS on real candles (the last 2,500 hours of the 5-year file; the seeded synthetic market when it is
absent). User classes with the usual bugs (tests/check_strategies.py) are each flagged; sound ones, the built-ins
and the model strategy never are. Through the CLI: `cryptobot check` exit codes and JSON, `backtest` warns and
records, `promote` refuses (78), the runner refuses at start (78) and the audit's strategy_evidence FAILs."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import check_strategies as U
from cryptobot.config import Settings
from cryptobot.strategy import (EmaCross, RsiReversion, StrategyCheckFailed, check_strategy,
                                finding_lines, make_strategy, save_strategy_artifact, trusted_check)
from cryptobot.model import ModelStrategy
from market import REAL_5Y

HERE = Path(__file__).resolve().parent
KEY, SECRET = "check-key-0001", "check-secret-0001"


@pytest.fixture(scope="module")
def candles():
    from cryptobot import data as D
    if REAL_5Y.exists():
        return D.load_candles(REAL_5Y).iloc[-2_500:]
    return D.synthetic_candles(n=2_500, seed=11)


BAD = {  # class -> the checks that may report it first (a whole-sample statistic is look-ahead and memory alike)
    "NextOpen": {"lookahead"}, "NextClose": {"lookahead"}, "ExitPeeks": {"lookahead"}, "Centred": {"lookahead"},
    "WholeSample": {"lookahead"}, "DailyHigh": {"lookahead"}, "Backfilled": {"lookahead"},
    "LastClose": {"lookahead"}, "Smoothed": {"lookahead"},
    "ShortEma": {"warmup"}, "NoWarmup": {"warmup"}, "AdjustedEwm": {"warmup"}, "ShortRsi": {"warmup"},
    "Anchored": {"memory"}, "AllTimeHigh": {"warmup", "memory"},
    "Noisy": {"determinism"}, "NanOut": {"output"}, "FloatOut": {"output"}, "Misaligned": {"output"},
}
SOUND = ["SoundEma", "Bollinger", "Donchian", "DailyPrev", "FeatureRule", "Seeded"]


@pytest.mark.parametrize("name", sorted(BAD))
def test_each_usual_bug_is_flagged(candles, name):
    if name == "NextOpen" and not REAL_5Y.exists():
        pytest.skip("the synthetic market opens each bar at the previous close: the next open is no news there")
    r = check_strategy(getattr(U, name)(), candles)
    print(name, r.summary(), *r.lines(), sep="\n  ")
    assert not r.passed and r.findings[0]["check"] in BAD[name], r.lines()
    f = r.findings[0]
    assert f["output"] in ("enter", "exit", "signals") and f["detail"] and "\n" not in f["detail"]
    if f["position"] is not None:
        assert f["bar"] == candles.index[f["position"]].isoformat()
    if f["check"] == "warmup":            # the smallest warm-up that passes, by doubling from the declared one
        w = getattr(U, name)().warmup
        assert r.suggested_warmup >= 2 * w and f"return at least {r.suggested_warmup}" in f["detail"]
        fixed = type("Fixed", (getattr(U, name),), {"warmup": property(lambda self: r.suggested_warmup)})
        assert check_strategy(fixed(), candles).findings == [] or name == "AllTimeHigh"
    rec = json.loads(json.dumps(r.record()))
    assert rec["passed"] is False and rec["findings"] == r.findings


@pytest.mark.parametrize("strategy", [*SOUND, "ema_cross", "rsi_reversion"])
def test_sound_strategies_pass(candles, strategy):
    s = (EmaCross(fast=5, slow=20) if strategy == "ema_cross" else RsiReversion(period=10, lower=25, upper=75)
         if strategy == "rsi_reversion"
         else U.SoundEma(fast=5, slow=20) if strategy == "SoundEma" else getattr(U, strategy)())
    r = check_strategy(s, candles)
    print(r.summary())
    assert r.passed, r.lines()
    assert r.cut_points >= 256 and r.windows >= 100 and r.record()["strategy_fingerprint"] == s.fingerprint()


@pytest.mark.parametrize("cls", [EmaCross, RsiReversion])
def test_the_builtins_with_their_defaults_pass(cls):
    "Defaults (windows of 899 and 935 candles) on the last 6,000 hours (the synthetic market when the file is absent)."
    from cryptobot import data as D
    c = D.load_candles(REAL_5Y).iloc[-6_000:] if REAL_5Y.exists() else D.synthetic_candles(n=6_000, seed=5)
    r = check_strategy(cls(), c)
    print(r.summary())
    assert r.passed and r.windows >= 256, r.lines()


def test_the_model_strategy_passes(candles, tmp_path):
    "The trained model (features built on each runner window, as the runner does) and its out-of-sample probabilities."
    from cryptobot import model as M
    path = M.train_walk_forward(candles.iloc[:1_900], n_folds=2, params={"max_iter": 20}).save(tmp_path / "models")
    ms = ModelStrategy(model=path, entry_threshold=0.5, exit_threshold=0.5)
    r = check_strategy(ms, candles)
    print(r.summary())
    assert r.passed, r.lines()
    assert r.windows >= 100 and r.cut_points >= 256
    p = pd.Series(np.random.default_rng(0).random(len(candles)), index=candles.index)
    assert check_strategy(ModelStrategy(proba=p, entry_threshold=0.8, exit_threshold=0.2), candles).passed
    # through the CLI as well
    data = tmp_path / "c.csv"
    candles.to_csv(data, index_label="timestamp")
    out = _cli(["check", "--strategy", "model", "--model", str(path), "--param", "entry_threshold=0.5",
                "--param", "exit_threshold=0.5", "--data", str(data)], tmp_path)
    assert out.returncode == 0 and ": PASS (" in out.stdout, out.stdout + out.stderr


def test_determinism_and_output_checks_come_first(candles):
    r = check_strategy(U.Noisy(), candles)
    assert [f["check"] for f in r.findings] == ["determinism"] and "seed" in r.findings[0]["detail"]
    r = check_strategy(U.NanOut(), candles)
    assert [f["check"] for f in r.findings] == ["output"] and "NaN" in r.findings[0]["detail"]


def test_too_few_candles_is_a_finding_not_a_pass(candles):
    r = check_strategy(EmaCross(), candles.iloc[:1_000])        # window 899: three windows do not fit
    assert [f["check"] for f in r.findings] == ["coverage"] and "at least" in r.findings[0]["detail"]


def _env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CRYPTOBOT_", "BINANCE_", "GO_LIVE"))}
    return {**env, "PYTHONPATH": os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]),
            "CRYPTOBOT_DATA_DIR": str(tmp_path / "data"), "CRYPTOBOT_STATE_DIR": str(tmp_path / "var"),
            "CRYPTOBOT_REPORTS_DIR": str(tmp_path / "reports")}


def _cli(args, tmp_path):
    code = "import sys; from cryptobot.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tmp_path,
                          env=_env(tmp_path), timeout=600)


def test_check_cli_exit_codes_lines_and_json(candles, tmp_path):
    data = tmp_path / "c.csv"
    candles.to_csv(data, index_label="timestamp")
    bad = _cli(["check", "--strategy", "check_strategies:ShortEma", "--param", "fast=5", "--param", "slow=20",
                "--data", str(data), "--json", str(tmp_path / "bad.json")], tmp_path)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    rec = json.loads((tmp_path / "bad.json").read_text())
    fails = [l for l in bad.stdout.splitlines() if l.strip().startswith("FAIL ")]
    assert len(fails) == len(rec["findings"]) >= 1                      # one line per finding
    assert fails[0].strip() == "FAIL " + finding_lines(rec["findings"])[0]
    assert fails[0].strip().startswith("FAIL warmup: first bar ") and ("(enter)" in fails[0] or "(exit)" in fails[0])
    assert set(rec["findings"][0]) >= {"check", "bar", "output", "detail"} and rec["params"]["slow"] == 20
    assert rec["strategy"] == "check_strategies:ShortEma" and rec["passed"] is False
    peek = _cli(["check", "--strategy", "check_strategies:NextClose", "--data", str(data)], tmp_path)
    assert peek.returncode == 1 and "FAIL lookahead: first bar" in peek.stdout, peek.stdout + peek.stderr
    good = _cli(["check", "--strategy", "check_strategies:Bollinger", "--param", "period=30", "--data", str(data),
                 "--json", str(tmp_path / "good.json")], tmp_path)
    assert good.returncode == 0 and ": PASS (" in good.stdout and "FAIL" not in good.stdout, good.stdout + good.stderr
    g = json.loads((tmp_path / "good.json").read_text())
    assert g["passed"] is True and g["findings"] == [] and g["params"]["period"] == 30
    # no stored candles, no --data: the synthetic market, said so
    syn = _cli(["check", "--strategy", "ema_cross", "--param", "fast=5", "--param", "slow=20", "--n-synthetic",
                "2500"], tmp_path)
    assert syn.returncode == 0 and "using the synthetic market" in syn.stdout and "(synthetic" in syn.stdout, syn.stdout


def test_backtest_warns_and_the_runner_and_audit_refuse(candles, tmp_path):
    "backtest: one warning line, the findings in its JSON and artifact; the runner refuses the artifact at start "
    "(exit 78, one line) and the audit's strategy_evidence FAILs it."
    from cryptobot import audit as A
    from cryptobot.live import StartupRefused, load_strategy, select_strategy
    data = tmp_path / "c.csv"
    candles.to_csv(data, index_label="timestamp")
    bt = _cli(["backtest", "--strategy", "check_strategies:NextClose", "--data", str(data), "--json",
               str(tmp_path / "bt.json"), "--save-artifact"], tmp_path)
    assert bt.returncode == 0, bt.stderr
    warn = [l for l in bt.stderr.splitlines() if "WARNING" in l]
    assert len(warn) == 1 and "strategy check failed: lookahead: first bar" in warn[0], bt.stderr
    out = json.loads((tmp_path / "bt.json").read_text())
    assert out["check"]["findings"][0]["check"] == "lookahead"
    art = tmp_path / "data" / "strategies" / "check_strategies.NextClose" / "strategy.json"
    assert json.loads(art.read_text())["check"]["findings"] == out["check"]["findings"]
    s = Settings(state_dir=tmp_path / "var", data_dir=tmp_path / "data", strategy="check_strategies:NextClose")
    with pytest.raises(StartupRefused) as e:
        load_strategy(s, select_strategy(s))
    assert "fails the strategy check" in str(e.value) and "lookahead" in str(e.value) and "\n" not in str(e.value)
    c = A.run_check("strategy_evidence", A.Evidence(s, env_files=[]))
    assert c.status == A.FAIL and "fails the strategy check" in c.evidence, c
    # a sound strategy's artifact from the same command: backtest's quick pass is recorded but not trusted as one;
    # the runner checks it again (fully) and loads it
    ok = _cli(["backtest", "--strategy", "check_strategies:Donchian", "--data", str(data), "--save-artifact"], tmp_path)
    assert ok.returncode == 0 and "WARNING" not in ok.stderr, ok.stderr
    s2 = Settings(state_dir=tmp_path / "var", data_dir=tmp_path / "data", strategy="check_strategies:Donchian")
    art2 = load_strategy(s2, select_strategy(s2))
    assert art2.manifest["check"]["passed"] is True and trusted_check(art2.manifest, select_strategy(s2)) is None


def test_a_recorded_pass_counts_only_for_its_own_strategy(candles, tmp_path):
    "An artifact whose recorded pass belongs to another strategy (or other parameters) is checked again, and refused."
    from cryptobot.live import StartupRefused, load_strategy
    sound = check_strategy(U.SoundEma(fast=5, slow=20), candles).record()
    assert trusted_check({"check": sound}, U.SoundEma(fast=5, slow=20)) is sound
    assert trusted_check({"check": sound}, U.SoundEma(fast=5, slow=21)) is None
    bad = U.ShortEma(fast=5, slow=20)
    assert trusted_check({"check": sound}, bad) is None
    quick = check_strategy(U.SoundEma(fast=5, slow=20), candles, spread=64, max_cuts=256).record()
    assert quick["passed"] and trusted_check({"check": quick}, U.SoundEma(fast=5, slow=20)) is None
    flagged = check_strategy(bad, candles, spread=64, max_cuts=256).record()
    assert trusted_check({"check": flagged}, bad) is flagged          # findings count even from a quick check
    art = save_strategy_artifact(bad, tmp_path / "art", check=sound)
    s = Settings(state_dir=tmp_path / "var", data_dir=tmp_path / "data")
    with pytest.raises(StartupRefused) as e:
        load_strategy(s, bad, art.parent)             # no stored candles: checked on the synthetic market
    assert "fails the strategy check" in str(e.value) and "warmup" in str(e.value)


def test_promote_refuses_a_flagged_strategy(candles, tmp_path):
    "sweep: one warning line, the findings in its JSON; promote: exit 78, one line, no artifact."
    data = tmp_path / "c.csv"
    candles.to_csv(data, index_label="timestamp")
    sw = _cli(["sweep", "--strategy", "check_strategies:ShortEma", "--grid", "fast=5,8", "--grid", "slow=20,30",
               "--data", str(data), "--id", "short", "--folds", "2", "--scheduler", "inprocess", "--json",
               str(tmp_path / "sw.json")], tmp_path)
    assert sw.returncode == 0, sw.stderr
    warn = [l for l in sw.stderr.splitlines() if "WARNING" in l]
    assert len(warn) == 1 and "strategy check failed: warmup" in warn[0], sw.stderr
    assert json.loads((tmp_path / "sw.json").read_text())["check"]["findings"][0]["check"] == "warmup"
    pr = _cli(["promote", "short", "--data", str(data)], tmp_path)
    lines = pr.stderr.strip().splitlines()
    assert pr.returncode == 78 and len(lines) == 1 and "fails the strategy check" in lines[0], pr.stderr
    assert not (tmp_path / "data" / "strategies").exists()
    # the library refuses too, with the record
    from cryptobot.sweep import promote
    with pytest.raises(StrategyCheckFailed) as e:
        promote(tmp_path / "data" / "sweeps" / "short", candles=candles)
    assert e.value.record["findings"]


def test_promote_records_the_check_of_a_sound_strategy(candles, tmp_path):
    data = tmp_path / "c.csv"
    candles.to_csv(data, index_label="timestamp")
    sw = _cli(["sweep", "--strategy", "check_strategies:Donchian", "--grid", "n=10,20,30", "--data", str(data),
               "--id", "don", "--folds", "2", "--scheduler", "inprocess"], tmp_path)
    assert sw.returncode == 0 and "WARNING" not in sw.stderr, sw.stderr
    pr = _cli(["promote", "don", "--data", str(data)], tmp_path)
    assert pr.returncode == 0, pr.stderr
    m = json.loads((tmp_path / "data" / "strategies" / "check_strategies.Donchian" / "strategy.json").read_text())
    assert m["check"]["passed"] is True and m["check"]["strategy_fingerprint"] == m["strategy_fingerprint"]
    assert m["check"]["candles"]["bars"] == len(candles)


@pytest.fixture
def emu():
    from cryptobot import data as D
    from cryptobot.emulator import Emulator
    e = Emulator(D.synthetic_candles(n=1_500, seed=3), clock="stepped", start=1_300, api_key=KEY, api_secret=SECRET)
    e.start()
    yield e
    e.stop()


def test_the_runner_refuses_a_flagged_strategy_at_start(emu, tmp_path):
    "`cryptobot paper` with a look-ahead strategy's artifact: exit 78, one startup_refused line naming the check."
    from cryptobot.live import EX_CONFIG, run, setup_logging
    strat = make_strategy("check_strategies:NextClose", {})
    save_strategy_artifact(strat, tmp_path / "data" / "strategies" / "check_strategies.NextClose")
    s = Settings(state_dir=tmp_path / "st", data_dir=tmp_path / "data", exchange_url=emu.base_url, api_key=KEY,
                 api_secret=SECRET, strategy="check_strategies:NextClose")
    buf = io.StringIO()
    setup_logging(s, stream=buf)
    rc = run(s, "paper", None, max_candles=1, logs=False, settle_s=0, poll_s=0.01, min_poll_s=0.01,
             rate_limit_ms=1.0, executor_kw={"settle_s": 0.0, "sleep": lambda _s: None})
    refused = [l for l in buf.getvalue().splitlines() if "startup_refused" in l]
    assert rc == EX_CONFIG and len(refused) == 1 and "fails the strategy check" in refused[0], buf.getvalue()[-2000:]
    assert "lookahead" in refused[0]
