"""Parity with the stop-market (issue 14): the live runner on the emulator listing STOP_LOSS (real ccxt client,
BinanceExecutor) against `cryptobot.backtest.simulate` on REAL candles, over a window where stops gap: a bar that
opens below the stop. A stop-market fills there at the open, which is the backtest's min(stop, open), so the trade
lists agree trade for trade with no divergence to explain (the stop-limit needs `stop_gap_below_limit` there)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

FILE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "binance-usdm_BTCUSDT_1h_2020-09-13_2025-09-11.csv"
N_WIN = 600
N_TRAIN = 6000

pytestmark = pytest.mark.skipif(not FILE.exists(), reason=f"real data file {FILE} absent (../shared/data)")


def _proba(c, res, M):
    from cryptobot.features import build_features
    feats = build_features(c)
    return pd.Series(M._proba(res.model, feats[res.manifest["feature_names"]].to_numpy("float64")), index=feats.index)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A model trained on the first bars; the first later window whose backtest has >= 10 trades. The 5-year file
    has only 3 bars that open below the previous bar's low, none under an open trade's stop, so the window gets one
    gap: the bar after the first trade's entry bar opens 0.5 % below its stop (the same candles go to both sides)."""
    from cryptobot import data as D, model as M
    from cryptobot.backtest import simulate
    from cryptobot.config import Settings
    from cryptobot.risk import Market, RiskEngine

    c = D.load_candles(FILE)
    res = M.train_walk_forward(c.iloc[:N_TRAIN], n_folds=2, params={"max_iter": 40})
    oos = res.oos["proba"]
    strat = M.ThresholdPolicy(entry_threshold=float(oos.quantile(0.6)), exit_threshold=float(oos.quantile(0.4)), max_hold=12)
    s = Settings(kill_switch_losses=10)
    sim = lambda cc, start, pr: simulate(cc.iloc[start - 1:start + N_WIN], pr.reindex(cc.index[start - 1:start + N_WIN]),
                                         strat, RiskEngine.from_settings(s), Market(), 0.001, 0.0005, 10_000.0)
    proba_all = _proba(c, res, M)
    for start in range(N_TRAIN + 800, len(c) - N_WIN - 1, N_WIN):
        bt = sim(c, start, proba_all)
        if len(bt) >= 10 and (bt["exit_bar"] - bt["entry_bar"] >= 2).any():
            break
    t = bt[bt["exit_bar"] - bt["entry_bar"] >= 2].iloc[0]
    k = c.index.get_loc(t["entry_time"]) + 1                          # the bar after the entry bar
    c = c.copy()
    o = float(t["stop_price"]) * 0.995
    c.iloc[k, c.columns.get_loc("open")] = o
    c.iloc[k, c.columns.get_loc("low")] = min(float(c["low"].iloc[k]), o * 0.999)
    c.iloc[k, c.columns.get_loc("high")] = max(float(c["high"].iloc[k]), o)
    bt = sim(c, start, _proba(c, res, M))
    stops = bt[bt["exit_reason"] == "stop"]
    gaps = stops[stops["exit_price"] < stops["stop_price"] - 1e-9]       # exits at an open below the stop
    assert len(gaps) >= 1 and len(bt) >= 10, "the injected gap did not stop a trade out"
    res.manifest["strategy"] = strat.to_dict()
    art = M.load_artifact(res.save(tmp_path_factory.mktemp("models")))
    return dict(c=c, start=start, art=art, bt=bt, gaps=gaps, settings=s, tmp=tmp_path_factory)


def test_stop_market_parity_with_gaps(setup):
    from cryptobot.emulator import ORDER_TYPES_STOP_MARKET
    from cryptobot.parity import compare_trades, format_comparison, replay
    r = replay(setup["c"], setup["art"], n_candles=N_WIN, start=setup["start"], fills="exchange",
               state_dir=setup["tmp"].mktemp("state"), settings=setup["settings"], unlock_kill_switch=True,
               order_types=ORDER_TYPES_STOP_MARKET)
    bt, lv = setup["bt"], r.trades
    cmp = compare_trades(lv, bt)
    print(r.summary())
    print(format_comparison(cmp))
    assert cmp["divergences"] == [], format_comparison(cmp)               # gaps included: nothing to explain
    assert cmp["n_live"] == cmp["n_backtest"] == cmp["matched_entries"] == cmp["same_exit_bar"] == cmp["same_reason"]
    assert cmp["max_entry_price_rel"] <= 1e-9 and cmp["max_exit_price_rel"] <= 1e-9
    assert cmp["max_pnl_diff_bp_of_notional"] <= 1.0
    stops = r.emulator["orders_created"]
    assert stops >= 2 * cmp["n_live"]
    from cryptobot.journal import Journal
    with Journal(r.journal_path, readonly=True) as j:
        types = {x["type"] for x in j.select("SELECT type FROM intents WHERE purpose = 'stop'")}
    assert types == {"stop_loss"}                                          # every stop was a stop-market
    gap_entries = set(setup["gaps"]["entry_time"])
    live_gapped = lv[lv["entry_time"].isin(gap_entries)]
    assert len(live_gapped) == len(gap_entries) and (live_gapped["exit_reason"] == "stop").all()
