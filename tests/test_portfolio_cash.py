"""Same-candle entries never cost more than the cash free at the candle's close: through a restart inside the candle
(after an exit of that candle sold), and when market buys fill above the slippage allowance. Real `ccxt.binance`
client, the emulator on 127.0.0.1, the real journal, Guardian and executors of `start_portfolio`."""
from __future__ import annotations

import pytest

from cryptobot.config import Settings
from cryptobot.emulator import Emulator
from cryptobot.guardian import Approval, Signal
from cryptobot.live import start_portfolio
from cryptobot.risk import Plan

KEY, SECRET = "cash-key-4d2b71", "cash-secret-Hq55rt"
SYMS = ("BTC/USDT", "ETH/USDT")
START = 640
FAST = {"executor_kw": {"settle_s": 0.0, "sleep": lambda _s: None}, "retry": {"retries": 2, "base_delay": 0.01},
        "rate_limit_ms": 1.0, "settle_s": 0.0, "poll_s": 0.02, "min_poll_s": 0.01}


@pytest.fixture
def rig(tmp_path):
    from cryptobot.data import synthetic_candles
    from cryptobot.strategy import make_strategy, save_strategy_artifact
    candles = {"BTC/USDT": synthetic_candles(n=1_000, seed=1, start_price=10_000.0),
               "ETH/USDT": synthetic_candles(n=1_000, seed=2, start_price=500.0)}
    strat = make_strategy("ema_cross", {"fast": 3, "slow": 8})
    arts = {sym: save_strategy_artifact(strat, tmp_path / "art" / sym.replace("/", ""), symbol=sym,
                                        timeframe="1h").parent for sym in SYMS}
    made = []

    def make(**emu_kw):
        emu = Emulator(candles, timeframe="1h", balances={"USDT": 10_000.0}, api_key=KEY, api_secret=SECRET,
                       clock="stepped", start=START, **emu_kw).start()
        s = Settings(state_dir=tmp_path / "state", exchange_url=emu.base_url, api_key=KEY, api_secret=SECRET,
                     symbols=SYMS, max_open_positions=3, max_total_risk_pct=5.0)
        start = lambda: start_portfolio(s, "paper", arts, strategy=strat, **FAST)  # noqa: E731
        made.append(emu)
        return emu, candles, start
    yield make
    for e in made:
        e.stop()


def _enter(pr, runner, t, price) -> tuple[Plan, dict]:
    "One entry as the runner makes it: the portfolio's context, the Guardian's size and approval, the executor's buy."
    ctx = pr._context(runner.executor, now=t + 1, last_candle_close=t, feature_fingerprint=runner.fp, price=price)
    plan = pr.guardian.size_entry(runner.symbol, t, price, ctx, runner.executor.market)
    assert isinstance(plan, Plan), plan
    ap = pr.guardian.approve(Signal(runner.symbol, "buy", t, runner.model_fp), plan, ctx)
    assert isinstance(ap, Approval), ap
    return plan, runner.executor.enter(ap)


def _close(candles, sym, t) -> float:
    "The close of `sym`'s candle closing at `t` (unix s)."
    import pandas as pd
    return float(candles[sym].loc[pd.Timestamp(t - 3600, unit="s", tz="UTC"), "close"])


def test_a_restart_inside_the_candle_sizes_from_the_cash_free_at_its_close(rig):
    "BTC's exit sells on candle t, the runner is killed and restarted: ETH's entry on t is sized from the cash free "
    "at t's close, as the uninterrupted runner sizes it, not from the exit's proceeds as well (the soak's finding)."
    emu, candles, start = rig()
    pr = start()
    btc, eth = pr.runners
    t0 = emu.now.timestamp()
    _enter(pr, btc, t0, _close(candles, "BTC/USDT", t0))
    emu.advance(1)
    t1 = emu.now.timestamp()
    free_close = emu.balances["USDT"]["free"]
    assert btc.executor.exit(t1, "signal") is not None                 # candle t1's exit: proceeds after the close
    assert emu.balances["USDT"]["free"] > free_close + 1_000
    pr.close()
    pr = start()                                                       # restarted inside candle t1
    try:
        eth = pr.runners[1]
        price = _close(candles, "ETH/USDT", t1)
        ctx = pr._context(eth.executor, now=t1 + 1, last_candle_close=t1, feature_fingerprint=eth.fp, price=price)
        assert ctx.free_quote == pytest.approx(free_close, rel=1e-9), (ctx.free_quote, free_close)
        plan, res = _enter(pr, eth, t1, price)
        spent = sum(f["price"] * f["amount"] for f in pr.journal.fills(res.client_order_id))
        assert res.filled > 0 and spent <= free_close * (1 + 1e-9), (spent, free_close)
        assert plan.limited_by in ("cash", "portfolio_cash"), plan
    finally:
        pr.close()


def test_same_candle_entries_filling_above_the_allowance_never_exceed_the_cash_at_the_close(rig):
    "The exchange fills market buys 0.6 % above the close (the allowance is 0.05 %): the first entry's real cost is "
    "charged to the second, whose own worst case is then what is left; together they stay within the cash."
    emu, candles, start = rig(slippage_pct=0.6)
    pr = start()
    try:
        btc, eth = pr.runners
        emu.advance(1)
        t = emu.now.timestamp()
        free_close = emu.balances["USDT"]["free"]
        _, a = _enter(pr, btc, t, _close(candles, "BTC/USDT", t))
        _, b = _enter(pr, eth, t, _close(candles, "ETH/USDT", t))
        spent = sum(f["price"] * f["amount"] for r in (a, b) for f in pr.journal.fills(r.client_order_id))
        assert a.filled > 0 and b.filled > 0, (a, b)
        assert spent <= free_close * (1 + 1e-9), (spent, free_close)
        assert not [o for o in emu.orders if o["status"] == "REJECTED"]
    finally:
        pr.close()
