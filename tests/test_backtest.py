"""cryptobot.backtest: THE FILL RULES, trade for trade, and vectorbt agreeing with the simulation."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryptobot.backtest import (BacktestError, check_against_vectorbt, portfolio, run_backtest, simulate)
from cryptobot.model import ThresholdPolicy
from cryptobot.risk import FEE, SLIPPAGE, CostError
from cryptobot.risk import Market, Plan, RiskEngine

RE, MK = RiskEngine(), Market()


def bars(rows, start="2024-01-01"):
    idx = pd.date_range(start, periods=len(rows), freq="h", tz="UTC", name="timestamp")
    df = pd.DataFrame(rows, columns=["open", "high", "low", "close"], index=idx, dtype="float64")
    df["volume"] = 1.0
    return df


def random_walk(n, seed, vol=0.006, wick=0.004, gap=0.0):
    rng = np.random.default_rng(seed)
    close = 20_000 * np.exp(np.cumsum(rng.normal(0, vol, n)))
    open_ = np.r_[20_000.0, close[:-1]] * np.exp(rng.normal(0, gap, n))       # gaps between close and next open
    hi = np.maximum(open_, close) * (1 + np.abs(rng.normal(0, wick, n)))
    lo = np.minimum(open_, close) * (1 - np.abs(rng.normal(0, wick, n)))
    return bars(list(zip(open_, hi, lo, close)))


S = ThresholdPolicy(entry_threshold=0.6, exit_threshold=0.4, max_hold=3)


# --- hand-built candles ---------------------------------------------------------------------------------------------

def test_no_same_bar_fill_for_entries():
    cd = bars([(100, 101, 99.5, 100), (103, 104, 102.5, 103.5), (103.5, 104, 103, 103.8)])
    tr = simulate(cd, [0.7, 0.5, 0.5], S, RE, MK)
    assert tr.entry_bar[0] == 1 and tr.entry_price[0] == 103 * (1 + SLIPPAGE)   # next open, not close[0]=100
    assert tr.stop_price[0] == 101.5              # 1.5 % below the fill 103.0515 (101.5057 down), not 98.5 from close[0]
    assert tr.amount[0] == RE.plan(price=100.0, equity=10_000.0, free_quote=10_000.0, market=MK).amount   # sized at the close


def test_stop_fires_on_the_entry_bar():
    cd = bars([(100, 100, 100, 100), (100.2, 100.5, 98.0, 99.0), (99, 99, 99, 99)])
    tr = simulate(cd, [0.7, 0.5, 0.5], S, RE, MK)
    # fill 100.2 × 1.0005 = 100.2501; × 0.985 = 98.7463... -> 98.74 on the 0.01 tick
    assert (tr.entry_bar[0], tr.exit_bar[0], tr.exit_reason[0], tr.exit_price[0]) == (1, 1, "stop", 98.74)


def test_bar_opening_below_the_stop_fills_at_the_open():
    cd = bars([(100, 100, 100, 100), (100, 100.5, 99.8, 100), (97, 97.5, 96, 97), (97, 97, 97, 97)])
    tr = simulate(cd, [0.7, 0.5, 0.5, 0.5], S, RE, MK)
    assert (tr.exit_bar[0], tr.exit_reason[0], tr.exit_price[0]) == (2, "stop", 97.0)


def test_entry_bar_gapping_below_the_planned_stop_keeps_a_stop_below_its_fill():
    "The entry bar opens 2 % under the decision close (below the plan's 98.5): the stop follows the fill down."
    cd = bars([(100, 100, 100, 100), (98, 98.2, 97.5, 98), (98, 98, 98, 98)])
    tr = simulate(cd, [0.7, 0.5, 0.5], S, RE, MK)
    assert tr.entry_price[0] == 98 * (1 + SLIPPAGE) and tr.exit_reason[0] == "open"   # 97.5 is above the stop
    assert tr.stop_price[0] == 96.57 < tr.entry_price[0]                              # 98.049 × 0.985 = 96.578... down


def test_signal_exit_at_next_open_before_the_stop():
    cd = bars([(100, 100, 100, 100), (100, 100.5, 99.8, 100), (99.5, 99.6, 95, 96), (96, 96, 96, 96)])
    tr = simulate(cd, [0.7, 0.1, 0.5, 0.5], S, RE, MK)
    assert (tr.exit_bar[0], tr.exit_reason[0], tr.exit_price[0]) == (2, "signal", 99.5 * (1 - SLIPPAGE))


def test_max_hold_exit():
    cd = bars([(100, 100, 100, 100)] + [(100 + i, 101 + i, 99.9 + i, 100.5 + i) for i in range(1, 7)])
    tr = simulate(cd, [0.7, 0.9, 0.9, 0.9, 0.9, 0.3, 0.5], S, RE, MK)
    assert tr.exit_reason.tolist() == ["max_hold", "signal"]
    assert (tr.entry_bar[0], tr.exit_bar[0], tr.bars_held[0]) == (1, 4, 3)
    assert (tr.entry_bar[1], tr.exit_bar[1]) == (5, 6)   # p=0.9 at bar 4's close re-enters; p=0.3 at bar 5's close exits


def test_last_trade_stays_open_marked_to_last_close():
    cd = bars([(100, 100, 100, 100), (100, 101, 99.9, 100.5), (100.5, 101, 100.4, 100.9)])
    tr = simulate(cd, [0.7, 0.5, 0.1], S, RE, MK)        # exit decided at the last close: no next open
    assert tr.exit_reason.tolist() == ["open"] and tr.exit_price[0] == 100.9 and tr.exit_bar[0] == 2
    assert tr.fees[0] == pytest.approx(tr.amount[0] * tr.entry_price[0] * FEE)
    assert tr.pnl[0] == pytest.approx(tr.amount[0] * (100.9 - tr.entry_price[0]) - tr.fees[0])
    assert tr.attrs["pending_at_end"] == "sell"
    pf = portfolio(cd, tr)
    assert pf.trades.records["status"][0] == 0                                   # vectorbt: open
    assert pf.final_value() == pytest.approx(tr.attrs["final_equity"], rel=1e-12)


def test_entry_decided_at_the_last_close_is_pending_not_filled():
    cd = bars([(100, 100, 100, 100), (100, 101, 99.9, 100.5)])
    tr = simulate(cd, [0.5, 0.7], S, RE, MK)
    assert tr.empty and tr.attrs["pending_at_end"] == "buy"


def test_fees_charged_both_sides_and_pnl():
    cd = bars([(100, 101, 99.5, 100), (100.5, 101, 100, 100.8), (100.8, 101.5, 100.5, 101), (101.2, 102, 101, 101.5)])
    for fee, slip in [(0.001, 0.0005), (0.0, 0.0), (0.002, 0.001)]:
        tr = simulate(cd, [0.7, 0.5, 0.3, 0.5], S, RE, MK, fee=fee, slippage=slip)
        a, ep, xp = tr.amount[0], tr.entry_price[0], tr.exit_price[0]
        assert ep == 100.5 * (1 + slip) and xp == 101.2 * (1 - slip)
        assert tr.fees[0] == pytest.approx(fee * a * (ep + xp), abs=1e-12)
        assert tr.pnl[0] == pytest.approx(a * (xp - ep) - fee * a * (ep + xp), rel=1e-12)
        assert tr.attrs["final_equity"] == pytest.approx(10_000 + tr.pnl[0], rel=1e-12)


def test_size_is_the_risk_engine_plan():
    cd = bars([(100, 100, 100, 100), (100, 101, 99.9, 100.5), (100.5, 101, 100.4, 100.9)])
    for cash in (10_000.0, 1_234.5, 50.0):
        tr = simulate(cd, [0.7, 0.5, 0.5], S, RE, MK, initial_cash=cash)
        plan = RE.plan(price=100.0, equity=cash, free_quote=cash, market=MK)
        assert isinstance(plan, Plan) and tr.amount[0] == plan.amount                  # sized at the decision close
        assert tr.stop_price[0] == RE.stop_for_fill(tr.entry_price[0], MK)[0] < tr.entry_price[0]   # stop at the fill
        assert tr.amount[0] * (100.0 - plan.stop_price) <= 0.01 * cash + 1e-9    # money at risk <= 1 %, as planned
        assert tr.amount[0] * 100.0 <= cash                                       # notional <= equity (1x)


def test_risk_rejection_means_no_trade():
    cd = bars([(100, 100, 100, 100), (100, 101, 99.9, 100.5), (100.5, 101, 100.4, 100.9)])
    tr = simulate(cd, [0.7, 0.7, 0.5], S, RE, MK, initial_cash=3.0)
    assert tr.empty and tr.attrs["rejections"] == 2


def test_inputs_are_checked():
    cd = bars([(100, 100, 100, 100)] * 3)
    with pytest.raises(BacktestError, match="probabilities"):
        simulate(cd, [0.5, 0.5], S, RE, MK)
    with pytest.raises(BacktestError, match="proba must be a Series"):
        run_backtest(cd, [0.5] * 3, S)


# --- the rules as invariants on random markets, and vectorbt agreeing trade for trade ---------------------------------

def replay_invariants(cd, p, strat, tr, fee=FEE, slip=SLIPPAGE, cash0=10_000.0):
    o, h, l, c = (cd[k].to_numpy() for k in ("open", "high", "low", "close"))
    equity = cash0
    prev_exit = 0
    for r in tr.itertuples():
        eb, xb = r.entry_bar, r.exit_bar
        for t in range(max(prev_exit, 0), eb - 1):                              # flat: no entry signal missed
            assert not (p[t] >= strat.entry_threshold)
        assert eb >= 1 and p[eb - 1] >= strat.entry_threshold                    # decided at the previous close
        assert r.entry_price == o[eb] * (1 + slip)                               # filled at the next open
        plan = RE.plan(price=c[eb - 1], equity=equity, free_quote=equity, market=MK)
        assert r.amount == plan.amount                                           # same sizing as live
        assert r.stop_price == RE.stop_for_fill(r.entry_price, MK)[0]            # the stop from the fill, as live
        assert r.amount * (c[eb - 1] - plan.stop_price) <= 0.01 * equity + 1e-9
        for t in range(eb, xb):                                                   # while held, before the exit bar
            assert l[t] > r.stop_price                                            # the stop would have fired
        if r.exit_reason == "stop":
            assert l[xb] <= r.stop_price and r.exit_price == min(r.stop_price, o[xb])
        elif r.exit_reason == "signal":
            assert p[xb - 1] < strat.exit_threshold and xb - eb < strat.max_hold
            assert r.exit_price == o[xb] * (1 - slip)
        elif r.exit_reason == "max_hold":
            assert xb - eb == strat.max_hold and r.exit_price == o[xb] * (1 - slip)
        else:
            assert r.exit_reason == "open" and xb == len(cd) - 1 and r.exit_price == c[-1]
        if r.exit_reason != "open":
            for t in range(eb, xb - 1):                                           # no earlier exit decision
                assert not (p[t] < strat.exit_threshold or t - eb + 1 >= strat.max_hold)
        fees = fee * r.amount * (r.entry_price + (r.exit_price if r.exit_reason != "open" else 0))
        assert r.fees == pytest.approx(fees, rel=1e-12)
        equity += r.pnl
        prev_exit = xb
    assert tr.attrs["final_equity"] == pytest.approx(equity, rel=1e-12) or tr.iloc[-1].exit_reason == "open"


@pytest.mark.parametrize("seed", range(6))
def test_random_markets_obey_the_rules_and_vectorbt_agrees(seed):
    cd = random_walk(3000, seed, gap=0.003 if seed % 2 else 0.0)
    rng = np.random.default_rng(100 + seed)
    p = np.clip(0.5 + 0.15 * rng.standard_normal(len(cd)), 0, 1)
    p[:50] = np.nan
    strat = ThresholdPolicy(0.62, 0.45, 6 + seed)
    proba = pd.Series(p, index=cd.index)
    res = run_backtest(cd, proba.iloc[50:], strat)
    span = cd.iloc[50:]
    tr = res.trades
    assert len(tr) > 50 and {"stop", "signal", "max_hold"} <= set(tr.exit_reason)
    replay_invariants(span, p[50:], strat, tr)
    # vectorbt's records equal the simulation's: count, bars, prices, size, PnL (1e-9 relative)
    check_against_vectorbt(res)
    vt = res.portfolio.trades.records
    assert len(vt) == len(tr)
    assert np.array_equal(vt["entry_idx"], tr["entry_bar"]) and np.array_equal(vt["exit_idx"], tr["exit_bar"])
    assert np.allclose(vt["entry_price"], tr["entry_price"], rtol=1e-12, atol=0)
    assert np.allclose(vt["exit_price"], tr["exit_price"], rtol=1e-12, atol=0)
    assert np.allclose(vt["pnl"], tr["pnl"], rtol=1e-9, atol=1e-9)
    assert np.allclose(vt["entry_fees"] + vt["exit_fees"], tr["fees"], rtol=1e-9, atol=1e-12)
    assert res.equity.iloc[-1] == pytest.approx(tr.attrs["final_equity"], rel=1e-9)
    assert res.stats["trades"] == len(tr) and res.stats["fees_paid"] == pytest.approx(tr.fees.sum())


def test_same_bar_entry_and_stop_reach_vectorbt_as_two_orders():
    cd = random_walk(2000, 11, vol=0.012, gap=0.006)
    p = pd.Series(0.7, index=cd.index)                           # always wants in: re-enters after every exit
    res = run_backtest(cd, p, ThresholdPolicy(0.6, 0.4, 4))
    tr = res.trades
    same = tr[(tr.entry_bar == tr.exit_bar)]
    assert len(same) > 5 and (same.exit_reason == "stop").all()
    check_against_vectorbt(res)
    orders = res.portfolio.orders.records
    assert len(orders) == 2 * len(tr) - (tr.exit_reason == "open").sum()


def test_check_against_vectorbt_can_fail():
    cd = random_walk(1500, 4)
    p = pd.Series(np.random.default_rng(4).uniform(0.3, 0.8, len(cd)), index=cd.index)
    res = run_backtest(cd, p, ThresholdPolicy(0.6, 0.45, 8))
    res.trades.loc[3, "pnl"] += 0.01
    with pytest.raises(BacktestError, match="pnl"):
        check_against_vectorbt(res)


def test_backtest_uses_only_the_probability_span():
    cd = random_walk(1000, 5)
    p = pd.Series(0.7, index=cd.index[400:700])
    res = run_backtest(cd, p, ThresholdPolicy(0.6, 0.4, 5))
    assert res.equity.index[0] == cd.index[400] and res.equity.index[-1] == cd.index[699]
    assert res.trades.entry_time.min() > cd.index[400]
    wrong = pd.Series(0.7, index=cd.index[400:700] + pd.Timedelta(minutes=30))
    with pytest.raises(BacktestError):
        run_backtest(cd, wrong, ThresholdPolicy(0.6, 0.4, 5))


def test_stats_are_consistent():
    cd = random_walk(3000, 8)
    p = pd.Series(np.random.default_rng(8).uniform(0.3, 0.8, len(cd)), index=cd.index)
    res = run_backtest(cd, p, ThresholdPolicy(0.6, 0.45, 8))
    s = res.stats
    assert s["total_return"] == pytest.approx(res.equity.iloc[-1] / 10_000 - 1)
    assert s["max_drawdown"] == pytest.approx((res.equity / res.equity.cummax() - 1).min())
    assert s["max_drawdown"] == pytest.approx(res.portfolio.max_drawdown(), rel=1e-9)
    closed = res.trades[res.trades.exit_reason != "open"]
    assert s["win_rate"] == pytest.approx((closed.pnl > 0).mean())
    assert 0 < s["exposure"] < 1
    assert s["buy_and_hold_return"] == pytest.approx(
        cd.close.iloc[-1] / (cd.open.iloc[0] * (1 + SLIPPAGE) * (1 + FEE)) - 1)


def test_runs_on_43776_bars():
    "Five years of hourly bars in one go (speed is measured by `cryptobot bench`, never asserted here)."
    cd = random_walk(43_776, 1)
    p = pd.Series(np.clip(0.5 + 0.12 * np.random.default_rng(1).standard_normal(len(cd)), 0, 1), index=cd.index)
    res = run_backtest(cd, p, ThresholdPolicy(0.68, 0.45, 12), vectorbt=False)   # ~1,000 trades, like the real model
    assert len(res.trades) > 500 and res.portfolio is None


# --- the kernel against an independent event loop (the pre-numba implementation, kept here as the oracle) -----------

def reference_loop(cd, enter, exit_, engine, market, fee, slip, cash, sizing="risk", max_hold=0, kill_switch=0):
    "THE FILL RULES in plain Python with the exact (Fraction) RiskEngine.plan: [(entry_bar, exit_bar, reason, amount,"
    " entry_price, exit_price)] and the lock bars."
    o, h, l, c = (cd[k].to_numpy().tolist() for k in ("open", "high", "low", "close"))
    amount, pend_buy, pend_sell, rows, losses, locked, locks = 0.0, None, None, [], 0, False, []
    step = market.amount_step

    def close(t, px, why):
        nonlocal cash, amount, losses, locked
        x_fee = amount * px * fee
        cash += amount * px - x_fee
        pnl = amount * (px - e_px) - e_fee - x_fee
        rows.append((e_bar, t, why, amount, e_px, px))
        amount = 0.0
        losses = losses + 1 if pnl <= 0 else 0
        if kill_switch and losses >= kill_switch and not locked:
            locked = True
            locks.append(t)

    for t in range(len(o)):
        if pend_buy is not None:
            px = o[t] * (1 + slip)
            amt = pend_buy.amount if sizing == "risk" else 0.0
            if sizing == "full" or amt * px * (1 + fee) > cash:
                amt = round(math.floor(cash / (px * (1 + fee)) / step + 1e-9) * step, 12)
            if amt > 0 and amt >= market.min_amount and amt * px >= market.min_notional:
                amount, e_bar, e_px, e_fee = amt, t, px, amt * px * fee
                cash -= amt * px + e_fee
                at_fill = engine.stop_for_fill(px, market)                     # the stop from the fill
                stop = at_fill[0] if isinstance(at_fill, tuple) else pend_buy.stop_price
            pend_buy = None
        elif pend_sell is not None:
            close(t, o[t] * (1 - slip), pend_sell)
            pend_sell = None
        if amount > 0 and l[t] <= stop:
            close(t, min(stop, o[t]), "stop")
        if amount > 0:
            if max_hold and t - e_bar + 1 >= max_hold:
                pend_sell = "max_hold"
            elif exit_[t]:
                pend_sell = "signal"
        elif enter[t] and not exit_[t] and not locked:
            plan = engine.plan(price=c[t], equity=cash, free_quote=cash, market=market)
            if isinstance(plan, Plan):
                pend_buy = plan
    if amount > 0:
        rows.append((e_bar, len(o) - 1, "open", amount, e_px, c[-1]))
    return rows, locks


def _random_signals(n, seed, p_enter=0.08, p_exit=0.08):
    rng = np.random.default_rng(seed)
    return rng.random(n) < p_enter, rng.random(n) < p_exit


@pytest.mark.parametrize("seed", range(8))
def test_kernel_equals_the_reference_loop_trade_for_trade(seed):
    from cryptobot.backtest import backtest, simulate_signals
    cd = random_walk(2500, 50 + seed, vol=0.006 + 0.002 * (seed % 3), gap=0.004 if seed % 2 else 0.0)
    en, ex = _random_signals(len(cd), seed)
    en[::97] = ex[::97] = True                                            # some bars carry both signals
    sizing = "full" if seed % 4 == 3 else "risk"
    ks = 3 if seed % 4 == 2 else 0
    mh = 5 if seed % 3 == 0 else 0
    want, want_locks = reference_loop(cd, en, ex, RE, MK, FEE, SLIPPAGE, 10_000.0, sizing, mh, ks)
    tr = simulate_signals(cd, en, ex, RE, MK, FEE, SLIPPAGE, 10_000.0, sizing=sizing, max_hold=mh or None,
                          kill_switch=ks or None)
    got = list(zip(tr.entry_bar, tr.exit_bar, tr.exit_reason, tr.amount, tr.entry_price, tr.exit_price))
    assert len(got) == len(want) > 5
    for g, w in zip(got, want):
        assert g[:3] == w[:3] and g[3] == w[3]                           # bars, reason, amount: exactly
        assert g[4] == pytest.approx(w[4], rel=1e-15) and g[5] == pytest.approx(w[5], rel=1e-15)
    assert tr.attrs["kill_switch_locks"] == len(want_locks)


def test_full_sizing_spends_all_the_cash():
    from cryptobot.backtest import simulate_signals
    cd = random_walk(800, 3)
    en, ex = _random_signals(len(cd), 3)
    tr = simulate_signals(cd, en, ex, RE, MK, 0.001, 0.0, 10_000.0, sizing="full")
    cash = 10_000.0
    for r in tr.itertuples():
        assert r.amount * r.entry_price * 1.001 <= cash < (r.amount + 2e-5) * r.entry_price * 1.001
        cash += r.pnl


def test_a_bar_with_both_signals_does_not_enter_and_exit_wins_in_a_position():
    from cryptobot.backtest import simulate_signals
    cd = bars([(100, 100.5, 99.9, 100)] * 6)
    both = np.array([True, False, False, False, False, False])
    assert simulate_signals(cd, both, both, RE, MK).empty
    en = np.array([True, True, True, True, False, False])
    ex = np.array([False, False, True, False, False, False])
    tr = simulate_signals(cd, en, ex, RE, MK)
    assert tr.exit_reason.tolist() == ["signal", "open"]
    assert tr.entry_bar.tolist() == [1, 4] and tr.exit_bar[0] == 3     # exit at bar 2's close -> bar 3's open;
                                                                         # bar 3 enters again -> bar 4


def test_take_profit_and_max_hold_are_off_unless_asked():
    from cryptobot.backtest import backtest
    from cryptobot.strategy import Strategy as Base

    class Once(Base):
        def signals(self, candles, features=None):
            e = pd.Series(False, candles.index); e.iloc[0] = True
            return e, pd.Series(False, candles.index)
    up = bars([(100 + i, 101 + i, 99.9 + i, 100.8 + i) for i in range(40)])
    assert backtest(up, Once()).trades.exit_reason.tolist() == ["open"]
    assert backtest(up, Once(max_hold=5)).trades.exit_reason.tolist() == ["max_hold"]
    tp = backtest(up, Once(take_profit_pct=5.0)).trades
    assert tp.exit_reason.tolist() == ["take_profit"]
    t = tp.exit_bar[0] - 1                                                 # decided at the previous close
    assert up.close.iloc[t] >= tp.entry_price[0] * 1.05 > up.close.iloc[t - 1]


def _losing(n=400):
    return bars([(100 - 0.1 * i, 100.05 - 0.1 * i, 99.8 - 0.1 * i, 99.9 - 0.1 * i) for i in range(n)])


def test_kill_switch_stays_locked_by_default_and_every_lock_is_listed():
    from cryptobot.backtest import backtest, result_json
    from cryptobot.strategy import Strategy as Base

    class Always(Base):
        def signals(self, candles, features=None):
            return pd.Series(True, candles.index), pd.Series(False, candles.index)
    cd = _losing()
    free = backtest(cd, Always(max_hold=1))
    stay = backtest(cd, Always(max_hold=1), kill_switch=3)
    assert len(free.trades) > 100 and (free.trades.pnl <= 0).all()
    assert len(stay.trades) == 3 and stay.stats["entries_denied_locked"] > 100
    assert stay.locks.lock_bar.tolist() == [stay.trades.exit_bar.iloc[-1]] and stay.locks.unlock_bar.tolist() == [-1]
    assert stay.equity.iloc[-1] == pytest.approx(stay.equity.iloc[stay.trades.exit_bar.iloc[-1]])  # flat afterwards
    again = backtest(cd, Always(max_hold=1), kill_switch=3, after_lock=50)
    locks = again.locks
    assert len(locks) >= 3 and (locks.unlock_bar[:-1] - locks.lock_bar[:-1] == 50).all()
    for lb, ub in zip(locks.lock_bar, locks.unlock_bar):                  # no entry while locked
        assert not ((again.trades.entry_bar > lb) & ((again.trades.entry_bar <= ub) | (ub < 0))).any()
    js = result_json(again)
    assert len(js["kill_switch_locks"]) == len(locks) and js["kill_switch_locks"][0]["losses"] == 3
    with pytest.raises(BacktestError, match="after_lock"):
        backtest(cd, Always(), kill_switch=3, after_lock="later")


def test_balance_floor_blocks_entries_below_it():
    from cryptobot.backtest import backtest
    from cryptobot.strategy import Strategy as Base

    class Always(Base):
        def signals(self, candles, features=None):
            return pd.Series(True, candles.index), pd.Series(False, candles.index)
    res = backtest(_losing(), Always(max_hold=1), min_balance=9_990.0)
    cash_before = 10_000.0 + res.trades.pnl.cumsum().shift(fill_value=0.0)
    assert (cash_before >= 9_990.0).all() and res.stats["entries_denied_floor"] > 0


REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "binance-usdm_BTCUSDT_1h_2020-09-13_2025-09-11.csv"


def test_the_ema_cross_anchor_from_the_command_line(tmp_path):
    "freqtrade: 768 trades (-8.61 %). One process, JSON and a self-contained HTML report, no vectorbt imported."
    if not REAL.exists():
        pytest.skip(f"real data absent: {REAL}")
    out, html = tmp_path / "out.json", tmp_path / "r.html"
    code = ("import sys; from cryptobot.cli import main; rc = main(sys.argv[1:]); "
            "print('VBT', 'vectorbt' in sys.modules); sys.exit(rc)")
    args = ["backtest", "--strategy", "ema_cross", "--param", "fast=12", "--param", "slow=26", "--sizing", "full",
            "--fee", "0.1", "--slippage", "0", "--data", str(REAL), "--json", str(out), "--html", str(html)]
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tmp_path,
                       env={**__import__("os").environ, "CRYPTOBOT_STATE_DIR": str(tmp_path)})
    assert p.returncode == 0, p.stderr
    assert "VBT False" in p.stdout
    js = json.loads(out.read_text())
    assert js["trades"] == 768
    assert {"trades", "total_return", "max_drawdown", "exits", "kill_switch_locks"} <= set(js)
    assert sum(js["exits"].values()) == 768 and js["kill_switch_locks"] == [] and js["kill_switch"] == "off"
    assert abs(js["total_return"] - (-0.0861)) < 0.01                    # freqtrade -8.61 %: same rules, near
    assert js["kill_switch_would_lock"]["after_losses"] == 3
    page = html.read_text()
    assert "Plotly.newPlot" in page and "<script src=" not in page


def test_cli_refuses_bad_strategy_arguments_in_one_line(tmp_path):
    for extra, msg in ((["--strategy", "ema_cross", "--param", "fast=40"], "fast=40 must be below slow=26"),
                       (["--strategy", "nope"], "unknown strategy 'nope'"),
                       (["--strategy", "ema_cross", "--kill-switch", "maybe"], "--kill-switch 'maybe'")):
        p = subprocess.run([sys.executable, "-c", "import sys; from cryptobot.cli import main; sys.exit(main(sys.argv[1:]))",
                            "backtest", *extra, "--data", "synthetic", "--n-synthetic", "2000"],
                           capture_output=True, text=True, cwd=tmp_path)
        assert p.returncode == 1 and msg in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.mark.parametrize("entry,kw,hint", [
    (e, kw, hint) for kw, hint in (({"fee": 0.1}, "fee=0.1 is a fraction (10 %): did you mean fee=0.001? "),
                                   ({"slippage": 0.5}, "slippage=0.5 is a fraction (50 %): did you mean slippage=0.005? "))
    for e in ("backtest", "simulate_signals", "run_backtest", "portfolio", "train_walk_forward")
    if not (e == "portfolio" and "slippage" in kw)])                 # portfolio() takes no slippage: the fills carry it
def test_a_fee_or_slippage_given_in_percent_is_refused_naming_the_fraction(entry, kw, hint):
    "The Python API takes fractions, the CLI percent: above 0.05 a side is refused in one line naming both forms."
    from cryptobot import backtest as B, model as M
    from cryptobot.data import synthetic_candles
    from cryptobot.strategy import EmaCross as Ema
    c = synthetic_candles(n=600, seed=3)
    flat = pd.Series(False, c.index)
    calls = {"backtest": lambda **k: B.backtest(c, Ema(), **k),
             "simulate_signals": lambda **k: B.simulate_signals(c, flat, flat, **k),
             "run_backtest": lambda **k: B.run_backtest(c, pd.Series(0.5, c.index), ThresholdPolicy(), **k),
             "portfolio": lambda **k: B.portfolio(c, B.simulate_signals(c, flat, flat), **k),
             "train_walk_forward": lambda **k: M.train_walk_forward(c, **k)}
    with pytest.raises(CostError) as e:
        calls[entry](**kw)
    msg = str(e.value)
    assert msg.startswith(hint) and f"the CLI's --{next(iter(kw))} takes percent" in msg and "\n" not in msg
    if entry in ("backtest", "simulate_signals"):        # the bound itself is a valid (if costly) fraction
        calls[entry](**{k: 0.05 for k in kw})


def test_cli_json_carries_the_full_trade_list_equal_to_the_python_backtest(tmp_path, monkeypatch):
    "`cryptobot backtest --json`: every trade (times, prices, amount, stop, fees, reason, PnL) as the Python API has it."
    from cryptobot.backtest import TRADE_COLUMNS, backtest
    from cryptobot.config import load_settings
    from cryptobot.data import synthetic_candles
    from cryptobot.strategy import make_strategy
    out = tmp_path / "out.json"
    env = {**__import__("os").environ, "CRYPTOBOT_STATE_DIR": str(tmp_path)}
    p = subprocess.run([sys.executable, "-c", "import sys; from cryptobot.cli import main; sys.exit(main(sys.argv[1:]))",
                        "backtest", "--strategy", "rsi_reversion", "--param", "period=7", "--data", "synthetic",
                        "--n-synthetic", "3000", "--json", str(out), "--html", str(tmp_path / "r.html")],
                       capture_output=True, text=True, cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr
    js = json.loads(out.read_text())
    monkeypatch.chdir(tmp_path)
    s = load_settings(env=env, dotenv_path=None)
    res = backtest(synthetic_candles(n=3000, timeframe=s.timeframe), make_strategy("rsi_reversion", {"period": 7}),
                   fee=s.fee_pct / 100, slippage=s.slippage_pct / 100, risk_engine=RiskEngine.from_settings(s),
                   min_balance=s.min_balance_usd)
    tr = res.trades
    assert len(tr) > 20 and len(js["trade_list"]) == len(tr) == js["trades"]
    for row, got in zip(tr.itertuples(index=False), js["trade_list"]):
        assert set(got) == set(TRADE_COLUMNS)
        for k in ("entry_time", "exit_time"):
            assert pd.Timestamp(got[k]) == getattr(row, k)
        assert got["exit_reason"] == row.exit_reason
        for k in ("entry_price", "exit_price", "amount", "stop_price", "fees", "pnl", "entry_bar", "exit_bar", "bars_held"):
            assert got[k] == getattr(row, k), k                       # exact: JSON floats read back equal
        assert got["return"] == tr.loc[tr.entry_bar == row.entry_bar, "return"].item()
    assert math.isclose(sum(t["pnl"] for t in js["trade_list"]), tr["pnl"].sum())
