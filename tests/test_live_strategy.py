"""The live runner trades a `cryptobot.strategy` rule with `decide()` on its trailing window (issue 11).

On a few hundred bars of the REAL 5-year file, for each built-in rule and a user-written class (`module:Class`):
every decision the runner journals (paper fills and exchange fills on the emulator) is the one the vectorised pass
(`checked_signals` over the whole history) reached for that bar, and the trades match THE FILL RULES
(`cryptobot.backtest.simulate_signals`) trade for trade. The runner refuses (exit 78, one line) a strategy whose
parameters or code differ from what was backtested (the strategy artifact's fingerprint)."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryptobot.config import Settings
from cryptobot.live import EX_CONFIG, run, setup_logging
from cryptobot.parity import compare_trades, format_comparison, replay
from cryptobot.strategy import EmaCross, RsiReversion, checked_signals, make_strategy, required_window, \
    save_strategy_artifact

FILE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "binance-usdm_BTCUSDT_1h_2020-09-13_2025-09-11.csv"
N_WIN = 300
KEY, SECRET = "strat-key-0001", "strat-secret-0001"

USER_SRC = '''
from cryptobot.strategy import Param, Strategy, ema


class Breakout(Strategy):
    "Long when the close clears the highest close of the last `n` bars above an EMA; out below the EMA."
    name = "breakout"
    params = {"n": Param(int, 20, 2, 500), "span": Param(int, 30, 2, 400)}

    @property
    def warmup(self):
        return 4 * self.span + self.n

    def signals(self, candles, features=None):
        c = candles["close"]
        e = ema(c, self.span)
        return (c > c.shift(1).rolling(self.n).max()) & (c > e), c < e
'''

needs_file = pytest.mark.skipif(not FILE.exists(), reason=f"real data file {FILE} absent (../shared/data)")


@pytest.fixture(scope="module")
def user_module(tmp_path_factory):
    d = tmp_path_factory.mktemp("usermod")
    (d / "my_rules.py").write_text(USER_SRC)
    sys.path.insert(0, str(d))
    yield d
    sys.path.remove(str(d))


@pytest.fixture(scope="module")
def real():
    from cryptobot import data as D
    c = D.load_candles(FILE)
    return c, len(c) - N_WIN - 4_000


def _vectorised(c, start, strat):
    "Signals over the whole history up to the window's end (the research pass), the decision bars' slice."
    hist = c.iloc[:start + N_WIN]
    enter, exit_ = checked_signals(strat, hist)
    sl = slice(start - 1, start + N_WIN)
    return c.iloc[sl], enter[sl], exit_[sl]


@needs_file
@pytest.mark.parametrize("spec,params", [("ema_cross", {"fast": 12, "slow": 26}),
                                         ("rsi_reversion", {"period": 14, "lower": 35, "upper": 65}),
                                         ("my_rules:Breakout", {"n": 10, "span": 20})])
@pytest.mark.parametrize("fills", ["paper", "exchange"])
def test_runner_decides_and_trades_like_the_vectorised_pass(real, user_module, tmp_path, spec, params, fills):
    from cryptobot.backtest import simulate_signals
    from cryptobot.risk import RiskEngine
    c, start = real
    strat = make_strategy(spec, params)
    s = Settings(kill_switch_losses=10)
    art = save_strategy_artifact(strat, tmp_path / "art", symbol=s.symbol, timeframe=s.timeframe)
    live = make_strategy(spec, {k: str(v) for k, v in params.items()})      # as CRYPTOBOT_STRATEGY_PARAMS gives them
    seen, decide = [], live.decide
    live.decide = lambda w, *a, **kw: (seen.append(len(w)), decide(w, *a, **kw))[1]
    r = replay(c, art.parent, n_candles=N_WIN, start=start, fills=fills, state_dir=tmp_path / "state", settings=s,
               strategy=live, unlock_kill_switch=True)
    assert set(seen) == {required_window(strat)} and len(seen) == N_WIN    # decide() saw exactly its window
    span, enter, exit_ = _vectorised(c, start, strat)
    # every decision bar: the runner's action is the vectorised pass's on that bar, given the position it held
    sig = r.signals
    assert len(sig) == N_WIN
    bar = span.index.get_indexer(sig["candle_time"] - pd.Timedelta(hours=1))
    assert (bar >= 0).all()
    flat = ~sig["position"].astype(bool).to_numpy()
    want = np.where(flat, np.where(enter[bar] & ~exit_[bar], "enter", "flat"),
                    np.where(exit_[bar], "exit", "hold"))
    assert (sig["action"].to_numpy() == want).all(), sig[sig["action"].to_numpy() != want].head()
    assert (sig["action"] == "enter").sum() >= 3, "too few entries for the comparison to mean much"
    # trade for trade against THE FILL RULES on the same bars
    bt = simulate_signals(span, enter, exit_, RiskEngine.from_settings(s), fee=s.fee_pct / 100,
                          slippage=s.slippage_pct / 100)
    cmp = compare_trades(r.trades, bt)
    print(r.summary(), format_comparison(cmp), sep="\n")
    assert len(bt) >= 2 and cmp["unexplained"] == [], format_comparison(cmp)
    assert cmp["n_live"] == cmp["n_backtest"] == cmp["matched_entries"] == cmp["same_exit_bar"] == cmp["same_reason"]
    assert cmp["max_entry_price_rel"] <= 1e-9 and cmp["max_exit_price_rel"] <= 1e-9
    assert cmp["max_pnl_diff_bp_of_notional"] <= 1.0


@pytest.fixture
def emu():
    from cryptobot import data as D
    from cryptobot.emulator import Emulator
    e = Emulator(D.synthetic_candles(n=1_500, seed=3), clock="stepped", start=1_300, api_key=KEY, api_secret=SECRET)
    e.start()
    yield e
    e.stop()


def _run(settings, model=None):
    buf = io.StringIO()
    setup_logging(settings, stream=buf)
    rc = run(settings, "paper", model, max_candles=1, logs=False, settle_s=0, poll_s=0.01, min_poll_s=0.01,
             rate_limit_ms=1.0, executor_kw={"settle_s": 0.0, "sleep": lambda _s: None})
    return rc, [l for l in buf.getvalue().splitlines() if "startup_refused" in l]


def test_runner_trades_only_the_backtested_parameters(emu, tmp_path):
    from cryptobot.strategy import artifact_dir
    s = Settings(state_dir=tmp_path / "st", data_dir=tmp_path / "data", exchange_url=emu.base_url,
                 api_key=KEY, api_secret=SECRET, strategy="ema_cross", strategy_params="fast=12,slow=26")
    rc, refused = _run(s)                                          # never backtested: no artifact
    assert rc == EX_CONFIG and len(refused) == 1 and "no usable strategy artifact" in refused[0]
    save_strategy_artifact(EmaCross(fast=12, slow=26), artifact_dir(s.data_dir, EmaCross()), symbol=s.symbol,
                           timeframe=s.timeframe)
    rc, refused = _run(s)
    assert rc == 0 and refused == [] and emu.requests                 # the backtested strategy runs
    import dataclasses
    rc, refused = _run(dataclasses.replace(s, strategy_params="fast=13,slow=26", state_dir=tmp_path / "st2"))
    assert rc == EX_CONFIG and len(refused) == 1 and "differs in its parameters" in refused[0]
    rc, refused = _run(dataclasses.replace(s, strategy="rsi_reversion", strategy_params="",
                                           state_dir=tmp_path / "st3"), model=artifact_dir(s.data_dir, EmaCross()))
    assert rc == EX_CONFIG and len(refused) == 1 and "differs in the strategy" in refused[0]


def test_runner_refuses_changed_strategy_code(emu, tmp_path):
    "A user's class edited after its backtest: same name and parameters, other code. `cryptobot paper` exits 78."
    mod = tmp_path / "mod"
    mod.mkdir()
    (mod / "my_rules2.py").write_text(USER_SRC)
    sys.path.insert(0, str(mod))
    try:
        strat = make_strategy("my_rules2:Breakout", {"n": 10})
        art = save_strategy_artifact(strat, tmp_path / "data" / "strategies" / "my_rules2.Breakout")
    finally:
        sys.path.remove(str(mod))
        sys.modules.pop("my_rules2", None)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(mod), os.environ.get("PYTHONPATH", "")]),
           "CRYPTOBOT_STRATEGY": "my_rules2:Breakout", "CRYPTOBOT_STRATEGY_PARAMS": "n=10",
           "CRYPTOBOT_EXCHANGE_URL": emu.base_url, "BINANCE_API_KEY": KEY, "BINANCE_API_SECRET": SECRET, "CRYPTOBOT_STATE_DIR": str(tmp_path / "st"),
           "CRYPTOBOT_DATA_DIR": str(tmp_path / "data")}
    code = "import sys; from cryptobot.cli import main; sys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", code, "paper", "--max-candles", "1"]
    ok = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "startup_refused" not in ok.stdout, ok.stdout[-2000:] + ok.stderr[-2000:]
    (mod / "my_rules2.py").write_text(USER_SRC.replace("c < e", "c < e * 0.99"))   # the exit rule changed
    bad = subprocess.run(cmd, env={**env, "CRYPTOBOT_STATE_DIR": str(tmp_path / "st2")}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    lines = [l for l in bad.stdout.splitlines() if "startup_refused" in l]
    assert bad.returncode == EX_CONFIG and len(lines) == 1 and "differs in its code" in lines[0], bad.stdout[-2000:]
    assert art.exists()



def test_backtest_cli_saves_the_artifact_the_runner_trades(emu, tmp_path):
    "`cryptobot backtest --strategy ... --save-artifact` writes DATA_DIR/strategies/<name>/strategy.json; the runner "
    "started with the same CRYPTOBOT_STRATEGY/_PARAMS trades it, and with another parameter refuses it."
    import dataclasses
    import json
    env = {**os.environ, "CRYPTOBOT_DATA_DIR": str(tmp_path / "data"), "CRYPTOBOT_STATE_DIR": str(tmp_path / "st"),
           "CRYPTOBOT_REPORTS_DIR": str(tmp_path / "rep")}
    code = "import sys; from cryptobot.cli import main; sys.exit(main(sys.argv[1:]))"
    p = subprocess.run([sys.executable, "-c", code, "backtest", "--strategy", "rsi_reversion", "--param", "period=10",
                        "--data", "synthetic", "--n-synthetic", "2000", "--save-artifact"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    m = json.loads((tmp_path / "data" / "strategies" / "rsi_reversion" / "strategy.json").read_text())
    assert m["params"]["period"] == 10 and m["strategy_fingerprint"] == RsiReversion(period=10).fingerprint()
    assert "strategy artifact:" in p.stdout and m["backtest"]["trades"] >= 0
    s = Settings(state_dir=tmp_path / "st", data_dir=tmp_path / "data", exchange_url=emu.base_url, api_key=KEY,
                 api_secret=SECRET, strategy="rsi_reversion", strategy_params="period=10")
    assert _run(s) == (0, [])
    rc, refused = _run(dataclasses.replace(s, strategy_params="period=11", state_dir=tmp_path / "st2"))
    assert rc == EX_CONFIG and "differs in its parameters" in refused[0]


# --- the model as a strategy: the runner trades the artifact's cost-aware policy (issue 11) ------------------------

TRAIN = slice(5_776, 11_776)    # 2021-05 .. 2022-01 of the real file: its cost-aware policy trades (measured)
N_MODEL = 300                   # decisions replayed, from the first bar after the training span


@pytest.fixture(scope="module")
def policy_model(tmp_path_factory):
    "A model trained on a real span whose walk-forward policy beat costs; its artifact and the candles."
    from market import real_candles
    from cryptobot import features as F, model as M
    c = real_candles()
    res = M.train_walk_forward(c.iloc[TRAIN], F.build_features(c.iloc[:TRAIN.stop]).iloc[TRAIN.start:], n_folds=4,
                               params={"max_iter": 100})
    return c, res, res.save(tmp_path_factory.mktemp("models"))


def _policy_vectorised(c, art_dir, policy, n):
    "The research pass for the manifest's policy: lean probabilities over the whole history, `policy_signals`."
    from cryptobot import features as F, model as M
    start = TRAIN.stop
    hist = c.iloc[:start + n]
    p = M.load_artifact(art_dir, lean=True).predict_proba(F.build_features(hist))
    oos = pd.DataFrame({"proba": p, "entry_threshold": policy["entry_threshold"] if policy["trade"] else np.nan,
                        "exit_threshold": policy["exit_threshold"] if policy["trade"] else np.nan}, index=hist.index)
    enter, exit_ = M.policy_signals(oos, hist)
    sl = slice(start - 1, start + n)
    return c.iloc[sl], enter[sl], exit_[sl]


def test_runner_trades_the_models_cost_aware_policy_like_the_vectorised_pass(policy_model, tmp_path):
    from cryptobot.backtest import simulate_signals
    from cryptobot.risk import RiskEngine
    c, res, art_dir = policy_model
    pol = res.manifest["policy"]
    assert pol["trade"] and pol["entry_threshold"] > 0.6 and res.manifest["strategy"]["entry_threshold"] == \
        pol["entry_threshold"], pol                                     # not the old fixed 0.55 / 0.45
    s = Settings(kill_switch_losses=10)
    r = replay(c, art_dir, n_candles=N_MODEL, start=TRAIN.stop, fills="paper", state_dir=tmp_path / "state",
               settings=s, unlock_kill_switch=True)
    span, enter, exit_ = _policy_vectorised(c, art_dir, pol, N_MODEL)
    sig = r.signals
    assert len(sig) == N_MODEL
    bar = span.index.get_indexer(sig["candle_time"] - pd.Timedelta(hours=1))
    assert (bar >= 0).all()
    flat = ~sig["position"].astype(bool).to_numpy()
    held = sig["bars_held"].to_numpy()
    want = np.where(flat, np.where(enter[bar] & ~exit_[bar], "enter", "flat"),
                    np.where(exit_[bar] | (held >= pol["max_hold"]), "exit", "hold"))
    assert (sig["action"].to_numpy() == want).all(), sig[sig["action"].to_numpy() != want].head()
    assert (sig["action"] == "enter").sum() >= 3, "too few entries for the comparison to mean much"
    bt = simulate_signals(span, enter, exit_, RiskEngine.from_settings(s), fee=s.fee_pct / 100,
                          slippage=s.slippage_pct / 100, max_hold=pol["max_hold"])
    cmp = compare_trades(r.trades, bt)
    print(r.summary(), format_comparison(cmp), sep="\n")
    assert len(bt) >= 2 and cmp["unexplained"] == [], format_comparison(cmp)
    assert cmp["n_live"] == cmp["n_backtest"] == cmp["matched_entries"] == cmp["same_exit_bar"] == cmp["same_reason"]


def test_a_model_whose_policy_found_no_edge_never_enters(policy_model, tmp_path):
    "Same model and bars, manifest policy `trade: false`: no entry, every flat decision says no_edge_after_costs."
    import json
    import shutil
    from cryptobot import model as M
    c, res, art_dir = policy_model
    flat_dir = tmp_path / "flat" / art_dir.name
    shutil.copytree(art_dir, flat_dir)
    man = json.loads((flat_dir / "manifest.json").read_text())
    man["policy"] = {**man["policy"], "trade": False, "entry_threshold": None, "exit_threshold": None}
    man["strategy"] = M.policy_thresholds(man["policy"]).to_dict()
    (flat_dir / "manifest.json").write_text(json.dumps(man))
    r = replay(c, flat_dir, n_candles=N_MODEL, start=TRAIN.stop, fills="paper", state_dir=tmp_path / "state",
               settings=Settings(kill_switch_losses=10))
    assert len(r.signals) == N_MODEL and len(r.trades) == 0
    assert (r.signals["action"] == "flat").all() and (r.signals["reason"] == "no_edge_after_costs").all()
    span, enter, _ = _policy_vectorised(c, art_dir, res.manifest["policy"], N_MODEL)
    assert enter.sum() >= 3                        # the same bars with the trading policy would have entered


def test_runner_uses_explicit_thresholds_and_refuses_a_model_without_a_policy(policy_model, tmp_path):
    import json
    import shutil
    from cryptobot.live import StartupRefused, model_strategy, select_strategy
    from cryptobot.model import load_artifact
    c, res, art_dir = policy_model
    art = load_artifact(art_dir, lean=True)
    s = Settings(strategy="model", strategy_params="entry_threshold=0.55,exit_threshold=0.45")
    st = model_strategy(select_strategy(s), art)
    assert (st.entry_threshold, st.exit_threshold, st.trade) == (0.55, 0.45, True)       # the user's, explicitly
    st = model_strategy(select_strategy(Settings(strategy="model")), art)
    pol = res.manifest["policy"]
    assert (st.entry_threshold, st.exit_threshold, st.max_hold) == (pol["entry_threshold"], pol["exit_threshold"],
                                                                    pol["max_hold"])
    old = tmp_path / art_dir.name
    shutil.copytree(art_dir, old)
    man = json.loads((old / "manifest.json").read_text())
    del man["policy"]
    man["strategy"] = {"entry_threshold": 0.55, "exit_threshold": 0.45, "max_hold": 12}
    (old / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(StartupRefused, match="no cost-aware policy"):
        model_strategy(None, load_artifact(old, lean=True))


def test_model_decides_bar_by_bar_like_policy_signals_on_every_bar(policy_model):
    "ModelStrategy.decide on each bar's trailing window (what the tick runs) = policy_signals, flat and in position."
    from cryptobot.features import build_features
    from cryptobot.live import model_strategy
    from cryptobot.model import load_artifact
    from cryptobot.strategy import required_window
    c, res, art_dir = policy_model
    pol = res.manifest["policy"]
    n = 1_500
    span, enter, exit_ = _policy_vectorised(c, art_dir, pol, n)
    st = model_strategy(None, load_artifact(art_dir, lean=True))       # as the runner builds it: no thresholds given
    need = required_window(st)
    got_enter, got_exit = [], []
    for k in range(1, len(span)):                                        # decision bars TRAIN.stop .. TRAIN.stop+n-1
        i = TRAIN.stop - 1 + k
        w = c.iloc[i - need + 1:i + 1]
        f = build_features(w)
        got_enter.append(st.decide(w, f) == "enter")
        got_exit.append(st.decide(w, f, in_position=True, bars_held=1) == "exit")
    assert np.array_equal(np.array(got_enter), enter[1:] & ~exit_[1:])
    assert np.array_equal(np.array(got_exit), exit_[1:])
    assert sum(got_enter) >= 10 and sum(got_exit) >= 10
