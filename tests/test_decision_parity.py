"""`cryptobot parity` for a rule strategy (issue 19): the decisions the runner journaled (its `signal` events) against
the decisions of the same strategy's vectorised pass over the same candles. The real runner trades an EMA cross on
the emulator (`replay`: stepped clock, the real ccxt client over loopback, real SQLite); then one journaled decision
is tampered with, and the CLI names that bar, both decisions, and exits 1."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import pytest

from cryptobot.config import Settings
from cryptobot.journal import Journal, iso
from cryptobot.parity import decision_parity, replay
from cryptobot.strategy import EmaCross, save_strategy_artifact
from market import frame

PARAMS = "fast=3,slow=8"
N = 80


def _cli(state_dir, data, *extra, strategy="ema_cross", params=PARAMS):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRYPTOBOT_")}
    env.update({"CRYPTOBOT_STATE_DIR": str(state_dir), "CRYPTOBOT_STRATEGY": strategy,
                **({"CRYPTOBOT_STRATEGY_PARAMS": params} if params else {})})
    return subprocess.run([sys.executable, "-c", "import sys; from cryptobot.cli import main; sys.exit(main(sys.argv[1:]))",
                           "parity", "--data", str(data), *extra], capture_output=True, text=True,
                          cwd=state_dir.parent, env=env)


@pytest.fixture(scope="module")
def traded(tmp_path_factory):
    "The runner traded EMA(3/8) for N candles on the emulator; its journal, the candles as a CSV file."
    tmp = tmp_path_factory.mktemp("rule")
    df = frame(1_300)
    strat = EmaCross(fast=3, slow=8)
    art = save_strategy_artifact(strat, tmp / "art", symbol="BTC/USDT", timeframe="1h").parent
    r = replay(df, art, strategy=strat, n_candles=N, start=1_100, state_dir=tmp / "st",
               settings=Settings(strategy="ema_cross", strategy_params=PARAMS))
    data = tmp / "candles.csv"
    df.rename_axis("timestamp").reset_index().assign(
        timestamp=lambda x: x["timestamp"].dt.strftime("%Y-%m-%d %H:%M:%S")).to_csv(data, index=False)
    return tmp / "st", df, data, r


def test_the_runners_decisions_match_the_vectorised_pass(traded):
    st, df, data, r = traded
    acts = r.signals["action"].value_counts().to_dict()
    assert acts.get("enter", 0) >= 1 and acts.get("exit", 0) >= 1 and acts.get("hold", 0) >= 1, acts   # all kinds
    rep = decision_parity(Settings(state_dir=st, strategy="ema_cross", strategy_params=PARAMS), candles=df)
    assert rep.ok and rep.compared == rep.decisions == len(r.signals) >= N and rep.mismatched == 0, str(rep)
    p = _cli(st, data)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"decision parity OK: BTC/USDT ema_cross {{'fast': 3, 'slow': 8"), p.stdout
    assert f"{rep.compared}/{rep.decisions} journaled decisions compared" in p.stdout


def test_a_tampered_decision_is_named_with_its_bar_and_exits_1(traded, tmp_path):
    st, df, data, r = traded
    import shutil
    copy = tmp_path / "st"
    shutil.copytree(st, copy)
    con = sqlite3.connect(copy / "journal.sqlite")
    rows = con.execute("SELECT id, data FROM events WHERE kind = 'signal' ORDER BY id").fetchall()
    k = next(i for i, (_, d) in enumerate(rows) if i > 10 and json.loads(d)["action"] == "flat")
    eid, d = rows[k]
    d = json.loads(d)
    con.execute("UPDATE events SET data = ? WHERE id = ?", (json.dumps({**d, "action": "enter"}), eid))
    con.commit()
    con.close()
    p = _cli(copy, data)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert p.stdout.startswith("decision parity FAILED: BTC/USDT"), p.stdout
    assert f", 1 differ," in p.stdout
    assert f"first mismatch at the close of {iso(d['candle_time'])} (flat): live enter, backtest flat" in p.stdout


def test_other_parameters_than_the_runners_differ(traded):
    "Parity against another EMA (what a runner started with other settings than the backtest would show)."
    st, df, data, r = traded
    p = _cli(st, data, params="fast=5,slow=30")
    assert p.returncode == 1 and "decision parity FAILED" in p.stdout and "first mismatch at the close of" in p.stdout


def test_each_symbol_reads_only_its_own_decisions(tmp_path):
    "A portfolio journals each decision with its symbol; the first symbol's may carry none (a single runner)."
    df = frame(400)
    strat = EmaCross(fast=3, slow=8)
    from cryptobot.strategy import checked_signals
    en, ex = checked_signals(strat, df)
    s = Settings(state_dir=tmp_path, symbols=("BTC/USDT", "ETH/USDT"), strategy="ema_cross", strategy_params=PARAMS)
    t = [float(x) + 3600 for x in df.index.as_unit("s").asi8]          # each candle's close
    with Journal(tmp_path / "journal.sqlite") as j:
        for k in range(300, 340):
            flat = "enter" if en[k] and not ex[k] else "flat"
            j.log_event("signal", "", {"candle_time": t[k], "action": flat, "reason": None, "bars_held": 0,
                                       "position": False})                        # the single runner's (BTC)
            j.log_event("signal", "", {"candle_time": t[k], "action": "enter", "reason": None, "bars_held": 0,
                                       "position": False, "symbol": "ETH/USDT"})  # ETH always says enter
    btc = decision_parity(s, candles=df)
    eth = decision_parity(s, candles=df, symbol="ETH/USDT")
    assert btc.ok and btc.compared == 40, str(btc)
    assert eth.compared == 40 and eth.mismatched == int((~(en[300:340] & ~ex[300:340])).sum()) > 0, str(eth)


def test_the_model_keeps_the_feature_row_parity(tmp_path):
    "CRYPTOBOT_STRATEGY=model: the decisions are the model's, checked through its feature rows (nothing here: 2)."
    (tmp_path / "st").mkdir()
    Journal(tmp_path / "st" / "journal.sqlite").close()
    data = tmp_path / "c.csv"
    frame(300).rename_axis("timestamp").reset_index().to_csv(data, index=False)
    p = _cli(tmp_path / "st", data, strategy="model", params=None)
    assert p.returncode == 2 and p.stdout.startswith("parity NOTHING TO COMPARE: 0/0 journaled feature rows"), p.stdout
