"""cryptobot.exchange under every emulator fault (no duplicate order, no unprotected position, journal == the
emulator's book), and paper-vs-emulator parity: the same candles and signals give the same trades."""
from __future__ import annotations

import pytest

from cryptobot.config import Settings
from cryptobot.emulator import Emulator
from cryptobot.exchange import PaperExecutor
from cryptobot.guardian import Approval, Guardian, Signal
from cryptobot.journal import Journal
from cryptobot.risk import RiskEngine
from test_exchange import df, emu  # noqa: F401 - shared fixtures
from test_exchange import (FP, KEY, SECRET, SYM, MarketClock, approve, assert_consistent, env_for, frame, shape,
                           step)

FAULTS = {
    "429": ("rate_limit", {}),
    "418": ("ban", {}),
    "503": ("server_error", {"status": 503}),
    "502-executed": ("server_error", {"status": 502, "execute": True}),
    "-1001": ("internal_error", {}),
    "slow": ("slow", {"delay": 0.6}),
    "drop": ("drop", {}),
    "lost": ("lost", {}),
}


class Hook:
    "The client, with a fault armed just before a chosen call (the emulator arms faults for the *next* request)."

    def __init__(self, client, emu, when, kind, opts):
        self._c, self._emu, self._when, self._kind, self._opts = client, emu, when, kind, opts

    def __getattr__(self, name):
        return getattr(self._c, name)

    def _arm(self, what, endpoint, method):
        if self._when == what and self._kind:
            self._emu.faults.add(self._kind, endpoint=endpoint, method=method, **self._opts)
            self._kind = None

    def create_order(self, symbol, type, side, amount, price=None, params=None):
        what = {"buy": "entry"}.get(side) or ("stop" if (params or {}).get("stopLossPrice") else "sell")
        self._arm(what, "order", "POST")
        return self._c.create_order(symbol, type, side, amount, price, params)

    def cancel_order(self, id, symbol=None, params=None):
        self._arm("cancel", "order", "DELETE")
        return self._c.cancel_order(id, symbol, params)

    def fetch_my_trades(self, symbol=None, since=None, limit=None, params=None):
        self._arm("trades", "myTrades", "GET")
        return self._c.fetch_my_trades(symbol, since, limit, params)




@pytest.mark.parametrize("when", ["entry", "stop", "sell", "cancel"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_never_duplicates_never_leaves_a_position_unprotected(tmp_path, emu, df, fault, when):
    assert not emu._book.unique_client_ids                 # Binance's rule: a filled order's id is accepted again
    e = env_for(tmp_path, emu, timeout_ms=300)
    kind, opts = FAULTS[fault]
    e.ex.venue = Hook(e.client, emu, when, kind, opts)
    a = approve(e)
    res = e.ex.enter(a)
    assert res.filled == a.amount and res.stop_client_order_id, res
    assert_consistent(e)                                   # protected, nothing doubled, journal == book
    assert e.ex.reconciled and e.ex.position().stop_cid == res.stop_client_order_id
    step(e, df)
    trade = e.ex.exit(emu.now.timestamp())
    assert trade is not None and trade.amount == res.held
    assert e.ex.position() is None and len(e.j.trades()) == 1
    assert_consistent(e)
    assert e.ex.reconcile().ok
    assert emu.orders_created == 3                         # entry, stop, sell: exactly once each


def test_fault_on_reading_fills_is_retried(tmp_path, emu, df):
    e = env_for(tmp_path, emu, timeout_ms=300)
    a = approve(e)
    res = e.ex.enter(a)
    assert res.stop_client_order_id and emu.requests["GET /api/v3/myTrades"] == 0   # fills came with the order
    e.ex.venue = Hook(e.client, emu, "trades", "server_error", {"status": 503})
    shape(df, 1001, emu, low=a.stop_price - 100)
    assert step(e, df, 2) == ["protected", "stopped_out"]    # the stop's fills are read (503, then again)
    assert emu.requests["GET /api/v3/myTrades"] == 2
    assert_consistent(e)


def test_partial_entry_fill_is_protected_for_what_filled(tmp_path, emu, df):
    e = env_for(tmp_path, emu)
    emu.faults.add("partial", fraction=0.5)
    a = approve(e)
    res = e.ex.enter(a)
    assert res.status == "expired" and 0 < res.filled < a.amount
    assert res.held == e.ex.position().net and e.emu.order(client_order_id=res.stop_client_order_id)["qty"] == res.held
    assert_consistent(e)
    step(e, df)
    assert e.ex.exit(emu.now.timestamp()).amount == res.held
    assert_consistent(e)


def test_partial_stop_fill_sells_the_rest_at_market(tmp_path, emu, df):
    e = env_for(tmp_path, emu)
    a = approve(e)
    res = e.ex.enter(a)
    emu.faults.add("partial", fraction=0.4)
    shape(df, 1001, emu, low=a.stop_price - 20)            # triggers; limit is not reached, 40 % fills at the stop
    assert step(e, df, 2) == ["protected", "emergency_exit"]
    [t] = e.j.trades()
    assert t["exit_reason"] == "stop_unfilled" and abs(t["amount"] - res.held) < 1e-12
    stop = emu.order(client_order_id=res.stop_client_order_id)
    assert stop["status"] == "CANCELED" and 0 < stop["executed_qty"] < res.held
    assert_consistent(e)


def test_partial_exit_sell_retries_the_rest(tmp_path, emu, df):
    e = env_for(tmp_path, emu)
    res = e.ex.enter(approve(e))
    step(e, df)
    emu.faults.add("partial", fraction=0.5)
    trade = e.ex.exit(emu.now.timestamp())
    assert trade is not None and abs(trade.amount - res.held) < 1e-12
    sells = [o for o in emu.orders if o["side"] == "SELL" and o["type"] == "MARKET"]
    assert [o["status"] for o in sells] == ["EXPIRED", "FILLED"]
    assert_consistent(e)


# ------------------------------------------------------------------------------------------------ parity
def scenario() -> tuple:
    "Candles with shaped bars and the signal script: entry decisions (bar closes) and model exits."
    df = frame(1060)
    o = lambda i: float(df["open"].iloc[i])
    shape(df, 1003, low=o(1003) * 0.97)                                   # 1: stop-out
    for i in range(1006, 1010):                                          # 2: a winner, exit by the model
        shape(df, i, open=30_000 + 150 * (i - 1005), high=30_100 + 150 * (i - 1005), low=29_990 + 150 * (i - 1005),
              close=30_080 + 150 * (i - 1005))
    shape(df, 1013, open=29_200.0, high=29_250.0, low=29_150.0, close=29_200.0)   # 3: gap below the stop limit
    shape(df, 1017, open=29_000.0, high=29_900.0, low=28_990.0, close=29_800.0)   # 4: entry bar opens below the
    entries, exits = [1000, 1005, 1011, 1016, 1020], {1009: "model", 1019: "model", 1024: "max_hold"}  # plan's stop
    return df, entries, exits


def run(ex, df, entries, exits, advance, guardian, settings, set_now):
    for k in range(1000, 1030):
        advance(k)
        ct = df.index[k].timestamp() + 3600
        set_now(ct)
        pos = ex.position()
        if pos is None and k in entries:
            price = float(df["close"].iloc[k])
            ctx = ex.context(now=ct + 5, last_candle_close=ct, feature_fingerprint=FP, price=price)
            plan = RiskEngine.from_settings(settings).plan(price, ctx.equity, ctx.free_quote, ex.market)
            a = guardian.approve(Signal(SYM, "buy", ct, FP), plan, ctx)
            assert isinstance(a, Approval), a
            ex.enter(a)
        elif pos is not None and k in exits:
            ex.exit(ct, reason=exits[k])
    return ex.journal.trades()


def test_paper_and_emulator_give_the_same_trades(tmp_path):
    df, entries, exits = scenario()
    s_kw = dict(kill_switch_losses=10)
    # BinanceExecutor on the emulator
    with Emulator(df, api_key=KEY, api_secret=SECRET, balances={"USDT": 10_000}) as emu:
        e = env_for(tmp_path / "emu", emu, **s_kw)

        def adv(k):
            emu.advance(1)
            e.ex.on_candle(df.iloc[k])
        live = run(e.ex, df, entries, exits, adv, e.g, e.s, lambda t: None)
        assert_consistent(e)
    # PaperExecutor fed with the same closed candles and next opens
    d = tmp_path / "paper"
    s = Settings(state_dir=d, **s_kw)
    now = {"t": df.index[1000].timestamp()}
    clock = MarketClock(lambda: now["t"])
    j = Journal(d / "journal.sqlite", clock=clock)
    g = Guardian(s, d, j, clock=clock)
    ex = PaperExecutor(j, g, df.iloc[:1000], price=float(df["open"].iloc[1000]), settings=s, sleep=lambda _s: None,
                       settle_s=0)
    assert ex.reconcile().ok
    paper = run(ex, df, entries, exits, lambda k: ex.on_candle(df.iloc[k], price=float(df["open"].iloc[k + 1])), g, s,
                lambda t: now.update(t=t))
    # 4: the stop follows the fill under the gap (it used to be refused there, planned from the close above the open)
    assert [t["exit_reason"] for t in live] == ["stop", "model", "stop_unfilled", "model", "max_hold"]
    assert len(paper) == len(live) == 5
    for a, b in zip(live, paper):
        assert a["trade_key"] == b["trade_key"] and a["exit_reason"] == b["exit_reason"]
        for k in ("entry_time", "exit_time", "amount", "entry_price", "exit_price", "fees", "pnl"):
            assert abs(a[k] - b[k]) <= 1e-8, (k, a[k], b[k])
