"""cryptobot.exchange against the REAL ccxt.binance client and the emulator on 127.0.0.1: the trade life cycle,
approvals, the stop, emergency exits, restarts and reconciliation, credentials. Faults and parity: test_exchange_faults.py."""
from __future__ import annotations

import dataclasses
import logging
import time
from types import SimpleNamespace

import ccxt
import numpy as np
import pandas as pd
import pytest

from cryptobot.client import make_client
from cryptobot.config import Settings
from cryptobot.emulator import Emulator
from market import N, frame
from cryptobot.exchange import (BinanceExecutor, EntryRefused, ExchangeAuthError, Executor, OrderQueue,
                                PaperExecutor, Position, floor_step)
from cryptobot.guardian import Approval, Denial, Guardian, Reason, Signal
from cryptobot.journal import Journal, fill_key
from cryptobot.risk import RiskEngine

SYM = "BTC/USDT"
KEY, SECRET = "exch-key-5b1c", "exch-secret-Qw81ppZ"
FP = "f" * 64




def shape(df, i, emu=None, **ohlc):
    "Reshape bar i of the frame (and of a running emulator's tape: it copied the frame when it started)."
    for k, v in ohlc.items():
        df.iloc[i, df.columns.get_loc(k)] = v
    if emu is not None:
        tape = next(iter(emu.tapes.values()))
        tape.set_bar(i, *(float(df[k].iloc[i]) for k in ("open", "high", "low", "close", "volume")))
    return df


class MarketClock:
    "Guardian/journal clock = the emulator's market time + a few seconds (the runner polls just after a close)."

    def __init__(self, now_fn, lag=5.0):
        self.now_fn, self.lag = now_fn, lag

    def __call__(self):
        return self.now_fn() + self.lag


def env_for(tmp_path, emu, *, timeout_ms=2_000, key=KEY, secret=SECRET, reconcile=True, journal=None, **settings_kw):
    s = Settings(state_dir=tmp_path, **settings_kw)
    clock = MarketClock(lambda: emu.now.timestamp())
    j = journal or Journal(tmp_path / "journal.sqlite", clock=clock)
    g = Guardian(s, tmp_path, j, clock=clock)
    client = make_client(api_key=key, api_secret=secret, base_url=emu.base_url, timeout_ms=timeout_ms)
    ex = BinanceExecutor(client, j, g, s, sleep=lambda _s: None, settle_s=0.0)
    e = SimpleNamespace(s=s, j=j, g=g, ex=ex, emu=emu, client=client, clock=clock, dir=tmp_path)
    if reconcile:
        assert ex.reconcile().ok
    return e


def approve(e, price=None, equity=None):
    "A Guardian approval for an entry decided at the close of the last closed bar (= the emulator's now)."
    ct = e.emu.now.timestamp()
    price = price if price is not None else last_close(e)
    ctx = e.ex.context(now=ct + 5, last_candle_close=ct, feature_fingerprint=FP, price=price)
    plan = RiskEngine.from_settings(e.s).plan(price, equity or ctx.equity, ctx.free_quote, e.ex.market)
    a = e.g.approve(Signal(SYM, "buy", ct, FP), plan, ctx)
    assert isinstance(a, Approval), a
    return a


def fill_stop(e, res) -> tuple[float, float]:
    "(stop, stop-limit) 1.5 % below the entry's average FILL price as the exchange reported it, on the tick."
    return RiskEngine.from_settings(e.s).stop_for_fill(res.average, e.ex.market)


def last_close(e) -> float:
    return float(e.client.fetch_ohlcv(SYM, "1h", limit=2)[-2][4])


def step(e, df, n=1):
    "Advance the emulator n bars and hand each closed candle to the executor, like the runner does."
    out = []
    for _ in range(n):
        e.emu.advance(1)
        i = e.emu.bar - 1
        out.append(e.ex.on_candle(df.iloc[i]))
    return out


def emu_by_cid(emu) -> dict:
    by = {}
    for o in emu.orders:
        by.setdefault(o["client_order_id"], []).append(o)
    return by


def assert_consistent(e, start_usdt=10_000.0):
    "No duplicate order, no unprotected position, the journal agrees with the emulator's book."
    emu, j = e.emu, e.j
    by = emu_by_cid(emu)
    assert all(len(v) == 1 for v in by.values()), "a client order id was used twice"
    intents = {r["client_order_id"]: r for r in j.select("SELECT * FROM intents")}
    assert set(by) <= set(intents), f"orders on the exchange the journal does not know: {set(by) - set(intents)}"
    for cid, it in intents.items():
        last = j.select("SELECT * FROM orders WHERE client_order_id = ? ORDER BY id DESC LIMIT 1", (cid,))
        if cid not in by:
            assert last and last[0]["status"] == "rejected", f"{cid} never reached the exchange but is {last}"
            continue
        o = by[cid][0]
        want = {"FILLED": "closed", "NEW": "open", "PARTIALLY_FILLED": "open", "CANCELED": "canceled",
                "EXPIRED": "expired"}[o["status"]]
        assert last and last[0]["status"] == want, (cid, o["status"], last)
        assert abs((last[0]["filled"] or 0.0) - o["executed_qty"]) < 1e-12
    fills = {r["trade_id"]: r for r in j.select("SELECT * FROM fills")}
    assert len(fills) == len(emu.trades)
    for t in emu.trades:
        f = fills[fill_key("BTCUSDT", t["id"], t["orderId"], str(emu.uid))]   # account:market-trade@order
        assert abs(f["price"] - t["price"]) < 1e-9 and abs(f["amount"] - t["qty"]) < 1e-12
        assert abs(f["fee"] - t["commission"]) < 1e-12 and f["fee_currency"] == t["commissionAsset"]
    # balances implied by the journal's fills
    base = usdt = 0.0
    for f in fills.values():
        q = f["price"] * f["amount"]
        if f["side"] == "buy":
            base += f["amount"] - (f["fee"] if f["fee_currency"] == "BTC" else 0)
            usdt -= q
        else:
            base -= f["amount"]
            usdt += q - (f["fee"] if f["fee_currency"] == "USDT" else 0)
    bal = emu.balances
    assert abs(bal["BTC"]["free"] + bal["BTC"]["locked"] - base) < 1e-8
    assert abs(bal["USDT"]["free"] + bal["USDT"]["locked"] - (start_usdt + usdt)) < 1e-6
    pos = e.ex.position()
    if pos is not None and pos.open_amount > 0:
        stops = [o for o in emu.orders if o["type"] == "STOP_LOSS_LIMIT" and o["status"] in ("NEW", "PARTIALLY_FILLED")]
        assert len(stops) == 1, f"position {pos.entry_cid} open with {len(stops)} open stops"
        assert abs(stops[0]["qty"] - stops[0]["executed_qty"] - pos.open_amount) < 1e-12
        assert stops[0]["stop_price"] == pos.stop_price


@pytest.fixture
def df():
    return frame()


@pytest.fixture
def emu(df):
    with Emulator(df, api_key=KEY, api_secret=SECRET, balances={"USDT": 10_000}) as em:
        yield em


@pytest.fixture
def e(tmp_path, emu):
    return env_for(tmp_path, emu)


# ------------------------------------------------------------------------------------------------ life cycle
def test_full_life_cycle_stop_loss(e, df):
    shape(df, 1001, e.emu, low=df["open"].iloc[1001] * 0.97)       # the bar after the entry bar dips through the stop
    a = approve(e)
    res = e.ex.enter(a)
    assert res.status == "closed" and res.filled == a.amount and res.stop_client_order_id
    stop = e.emu.order(client_order_id=res.stop_client_order_id)
    assert stop["type"] == "STOP_LOSS_LIMIT" and stop["status"] == "NEW"
    S, L = fill_stop(e, res)                                 # from the fill (open × 1.0005), not the plan's close
    assert (stop["stop_price"], stop["price"]) == (S, L) and S != a.stop_price and S < res.average
    held = floor_step(a.amount - a.amount * 0.001, 1e-5)
    assert stop["qty"] == held == res.held                   # the stop covers what is held, net of the BTC fee
    assert_consistent(e)
    assert step(e, df) == ["protected"]
    assert step(e, df) == ["stopped_out"]
    assert e.ex.position() is None
    [t] = e.j.trades()
    assert t["trade_key"] == a.client_order_id and t["exit_reason"] == "stop"
    assert abs(t["exit_price"] - S) < 1e-9 and t["amount"] == held
    entry = df["open"].iloc[1000] * 1.0005
    assert abs(t["entry_price"] - entry) < 1e-6
    exp_fees = entry * held * 0.001 / 0.999 + S * held * 0.001
    assert abs(t["fees"] - exp_fees) < 1e-6
    assert abs(t["pnl"] - ((t["exit_price"] - t["entry_price"]) * held - t["fees"])) < 1e-8 and t["pnl"] < 0
    assert e.g.current_state.consecutive_losses == 1
    assert_consistent(e)
    assert e.emu.orders_created == 2                         # entry + stop, nothing else


def test_winning_exit_by_the_model_cancels_the_stop_then_sells(e, df):
    shape(df, 1001, e.emu, open=30_100.0, high=30_400.0, low=30_050.0, close=30_350.0)
    shape(df, 1002, e.emu, open=30_500.0, high=30_700.0, low=30_450.0, close=30_600.0)
    e.g.record_trade  # loss streak starts at 0
    a = approve(e)
    res = e.ex.enter(a)
    step(e, df, 2)
    trade = e.ex.exit(e.emu.now.timestamp())
    assert trade is not None and trade.exit_reason == "model" and trade.pnl > 0
    assert e.emu.order(client_order_id=res.stop_client_order_id)["status"] == "CANCELED"
    sells = [o for o in e.emu.orders if o["side"] == "SELL" and o["type"] == "MARKET"]
    assert len(sells) == 1 and sells[0]["executed_qty"] == res.held
    assert abs(trade.exit_price - 30_500.0 * (1 - 0.0005)) < 1e-6
    assert e.ex.position() is None and e.g.current_state.consecutive_losses == 0
    assert e.ex.exit(e.emu.now.timestamp()) is None            # flat: nothing more to do
    assert_consistent(e)


def test_exit_after_the_stop_already_filled_sells_nothing(e, df):
    shape(df, 1001, e.emu, low=df["open"].iloc[1001] * 0.97)
    a = approve(e)
    e.ex.enter(a)
    e.emu.advance(2)                                          # the stop fills; the runner has not synced yet
    posts = e.emu.requests["POST /api/v3/order"]
    trade = e.ex.exit(e.emu.now.timestamp())
    assert trade.exit_reason == "stop"
    assert e.emu.requests["POST /api/v3/order"] == posts      # no sell, no second anything
    assert e.emu.requests["DELETE /api/v3/order"] == 1        # one cancel attempt (answered: unknown order)
    assert len(e.j.trades()) == 1
    assert_consistent(e)


def test_stop_rejected_by_the_exchange_triggers_an_emergency_exit(e, df):
    "A fast market: between the entry's fill and the stop's request the price falls through where the stop goes."
    a = approve(e)
    o = float(df["open"].iloc[1000])
    shape(df, 1000, e.emu, high=o, low=o * 0.95, close=o * 0.951)          # the entry bar falls 5 % from its open
    send = e.client.create_order

    def fast_market(symbol, type_, side, amount, price=None, params=None):
        if (params or {}).get("stopLossPrice"):                           # the exchange's clock runs on meanwhile
            e.emu.set_time(df.index[1000] + pd.Timedelta(minutes=55))
        return send(symbol, type_, side, amount, price, params)
    e.client.create_order = fast_market
    res = e.ex.enter(a)
    assert res.filled > 0 and res.stop_client_order_id is None and res.emergency_exit
    rejected = e.j.last_events(5, kind="stop_rejected")
    assert rejected and "immediately" in rejected[-1]["message"].lower()
    sells = [o for o in e.emu.orders if o["side"] == "SELL"]
    assert [o["type"] for o in sells] == ["MARKET"] and sells[0]["status"] == "FILLED"
    [t] = e.j.trades()
    assert t["exit_reason"] == "stop_rejected" and t["amount"] == res.held
    assert e.ex.position() is None and e.g.current_state.consecutive_losses == 1
    assert_consistent(e)


def test_stop_triggered_below_its_limit_is_sold_at_market(e, df):
    a = approve(e)
    e.ex.enter(a)
    shape(df, 1001, e.emu, open=a.stop_limit_price - 100, low=a.stop_limit_price - 150, high=a.stop_limit_price - 90,
          close=a.stop_limit_price - 120)                      # gap below the limit: triggers, cannot fill
    assert step(e, df, 2) == ["protected", "emergency_exit"]
    [t] = e.j.trades()
    assert t["exit_reason"] == "stop_unfilled"
    assert abs(t["exit_price"] - df["open"].iloc[1002] * (1 - 0.0005)) < 1e-6
    stop = [o for o in e.emu.orders if o["type"] == "STOP_LOSS_LIMIT"][0]
    assert stop["status"] == "CANCELED" and stop["triggered"]
    assert_consistent(e)


def test_stop_cancelled_outside_the_bot_is_replaced(e, df):
    a = approve(e)
    res = e.ex.enter(a)
    e.client.cancel_order(None, SYM, {"clientOrderId": res.stop_client_order_id})    # a human or the exchange
    assert step(e, df) == ["stop_placed"]
    stops = [o for o in e.emu.orders if o["type"] == "STOP_LOSS_LIMIT"]
    assert [o["status"] for o in stops] == ["CANCELED", "NEW"] and stops[1]["qty"] == res.held
    assert e.j.last_events(3, kind="stop_replaced")
    assert step(e, df) == ["protected"]
    assert_consistent(e)


# ------------------------------------------------------------------------------------------------ approvals
def test_forged_reused_foreign_and_expired_approvals_send_nothing(e, tmp_path, df):
    a = approve(e)
    fake = SimpleNamespace(**{f.name: getattr(a, f.name) for f in dataclasses.fields(a)})
    with pytest.raises(EntryRefused, match="Approval"):
        e.ex.enter(fake)
    forged = object.__new__(Approval)
    for f in dataclasses.fields(a):
        object.__setattr__(forged, f.name, getattr(a, f.name))
    object.__setattr__(forged, "amount", a.amount * 10)
    with pytest.raises(EntryRefused, match="signature"):
        e.ex.enter(forged)
    other = Guardian(e.s, tmp_path / "other", Journal(tmp_path / "other" / "j.sqlite", clock=e.clock), clock=e.clock)
    with pytest.raises(EntryRefused, match="not issued by this Guardian"):
        e.ex.enter(_approval_from(other, e))
    assert e.emu.requests["POST /api/v3/order"] == 0
    e.ex.enter(a)                                              # the real one works once
    e.ex.exit(e.emu.now.timestamp())
    n = e.emu.requests["POST /api/v3/order"]
    with pytest.raises(EntryRefused, match="already redeemed"):
        e.ex.enter(a)
    e.emu.advance(1)
    b = approve(e)
    e.clock.lag = 10_000                                       # the approval outlives its validity
    with pytest.raises(EntryRefused, match="expired"):
        e.ex.enter(b)
    assert e.emu.requests["POST /api/v3/order"] == n


def _approval_from(g, e):
    ct = e.emu.now.timestamp()
    ctx = e.ex.context(now=ct + 5, last_candle_close=ct, feature_fingerprint=FP, price=last_close(e))
    plan = RiskEngine.from_settings(e.s).plan(last_close(e), ctx.equity, ctx.free_quote, e.ex.market)
    return g.approve(Signal(SYM, "buy", ct, FP), plan, ctx)


def test_not_reconciled_means_no_entry(tmp_path, emu):
    e = env_for(tmp_path, emu, reconcile=False)
    ct = emu.now.timestamp()
    ctx = e.ex.context(now=ct + 5, last_candle_close=ct, feature_fingerprint=FP, price=30_000.0)
    assert ctx.reconciled is False
    plan = RiskEngine.from_settings(e.s).plan(30_000.0, ctx.equity, ctx.free_quote, e.ex.market)
    d = e.g.approve(Signal(SYM, "buy", ct, FP), plan, ctx)
    assert isinstance(d, Denial) and Reason.NOT_RECONCILED in d.reasons
    assert e.ex.reconcile().ok and e.ex.reconciled
    assert isinstance(approve(e), Approval)


# ------------------------------------------------------------------------------------------------ restart
def test_restart_after_a_lost_entry_response_reconciles_once(tmp_path, emu, df):
    e = env_for(tmp_path, emu)
    a = approve(e)
    emu.faults.add("lost", endpoint="order", method="POST")

    class Crash(BaseException):
        pass

    def die(*_a, **_k):
        raise Crash()                                          # the process dies right after the unknown outcome
    e.ex._lookup = die
    with pytest.raises(Crash):
        e.ex.enter(a)
    assert emu.orders_created == 1 and e.j.open_intents(SYM)  # filled on the exchange, unknown to the journal
    e.j.close()
    # a new process: new journal handle, Guardian and executor on the same state dir
    e2 = env_for(tmp_path, emu, reconcile=False)
    assert not e2.ex.reconciled
    rep = e2.ex.reconcile()
    assert rep.ok, rep
    pos = e2.ex.position()
    assert pos is not None and pos.entry_cid == a.client_order_id and pos.stop_cid
    assert emu.orders_created == 2                             # entry + exactly one stop
    assert_consistent(e2)
    counts = lambda: [e2.j.select(f"SELECT COUNT(*) AS n FROM {t}")[0]["n"] for t in ("intents", "orders", "fills", "trades")]
    before = counts()
    rep2 = e2.ex.reconcile()
    assert rep2.ok and rep2.actions == () and counts() == before and emu.orders_created == 2
    stop_cid = pos.stop_cid
    assert e2.ex.sync() == "protected" and e2.ex.position().stop_cid == stop_cid
    # the restarted runner decides on the same candle again: refused by the Guardian, not by the exchange
    ct = emu.now.timestamp()
    ctx = e2.ex.context(now=ct + 5, last_candle_close=ct, feature_fingerprint=FP, price=last_close(e2))
    d = e2.g.approve(Signal(SYM, "buy", ct, FP), RiskEngine.from_settings(e2.s).plan(
        last_close(e2), ctx.equity, ctx.free_quote, e2.ex.market), ctx)
    assert isinstance(d, Denial) and emu.orders_created == 2 and emu.requests["POST /api/v3/order"] == 2


# ------------------------------------------------------------------------------------------------ client order ids
# The emulator follows Binance: a client order id is refused only while an earlier order with it is open, so a
# filled entry's id is accepted again. These show the executor never relies on the exchange to refuse a resend.
def _lost_entry(tmp_path, emu, naive: bool):
    "Enter while the entry's response is lost (the order is accepted and fills; the executor hears nothing)."
    e = env_for(tmp_path, emu)
    if naive:                    # negative control: resend on an unknown outcome without looking the id up first
        e.ex._lookup = lambda cid: None
    a = approve(e, equity=4_000.0)          # sized small enough that the balance would pay for a second buy
    emu.faults.add("lost", endpoint="order", method="POST")
    return e, a, e.ex.enter(a)


def test_lost_entry_response_is_looked_up_not_resent_under_binance_rules(tmp_path, emu):
    assert emu.orders == [] and not emu._book.unique_client_ids          # the default: Binance's rule
    e, a, res = _lost_entry(tmp_path, emu, naive=False)
    assert res.filled == a.amount and res.stop_client_order_id
    assert [o["client_order_id"] for o in emu.orders if o["side"] == "BUY"] == [a.client_order_id]
    assert emu.requests["POST /api/v3/order"] == 2 and emu.orders_created == 2    # the entry once, the stop once
    assert_consistent(e)


@pytest.mark.parametrize("strict", [False, True])
def test_negative_control_a_blind_resend_doubles_the_entry_under_binance_rules(tmp_path, df, strict):
    """The check above can fail: an executor that resends instead of looking up buys twice on Binance's rule; the
    emulator's opt-in never-reuse rule refuses that resend and so would hide the bug."""
    with Emulator(df, api_key=KEY, api_secret=SECRET, balances={"USDT": 10_000}, unique_client_ids=strict) as emu:
        e, a, res = _lost_entry(tmp_path, emu, naive=True)
        buys = [o["client_order_id"] for o in emu.orders if o["side"] == "BUY"]
        if strict:
            assert buys == [a.client_order_id]                            # refused "Duplicate order sent."
        else:
            assert buys == [a.client_order_id] * 2                        # accepted: a second position
            with pytest.raises(AssertionError, match="used twice"):
                assert_consistent(e)


def test_restart_after_a_crash_between_an_orders_status_and_its_fills_loses_no_fill(tmp_path, emu, df):
    "Found by the multi-seed SIGKILL soak: a final status journaled before its fills hid them from reconciliation."
    e = env_for(tmp_path, emu)
    a = approve(e)
    e.ex.enter(a)
    shape(df, 1001, emu, low=a.stop_price - 100)              # the stop fills when bar 1001 closes

    class Crash(BaseException):
        pass

    def die(*_a, **_k):
        raise Crash()                                          # the process dies as it journals the stop's fills
    e.j.record_fill = die
    assert step(e, df) == ["protected"]
    with pytest.raises(Crash):
        step(e, df)
    e.j.close()
    e2 = env_for(tmp_path, emu, reconcile=False)               # a new process on the same state dir
    rep = e2.ex.reconcile()
    assert rep.ok, rep
    assert e2.ex.position() is None and [t["exit_reason"] for t in e2.j.trades()] == ["stop"]
    assert emu.orders_created == 2                             # entry + stop: no replacement stop, no emergency sell
    assert_consistent(e2)


def test_restart_after_a_crash_before_the_send_marks_the_intent_not_sent(tmp_path, emu):
    e = env_for(tmp_path, emu)
    a = approve(e)
    e.g.redeem(a)                                              # journaled, then the process died before sending
    e2 = env_for(tmp_path, emu, reconcile=False, journal=e.j)
    rep = e2.ex.reconcile()
    assert rep.ok and any("not sent" in x for x in rep.actions)
    assert emu.orders_created == 0 and e2.ex.position() is None and not e2.j.open_intents(SYM)


def test_unknown_open_orders_are_reported_not_cancelled(e, caplog):
    foreign = e.client.create_order(SYM, "limit", "buy", 0.001, 20_000.0, {"clientOrderId": "human-order-1"})
    with caplog.at_level(logging.ERROR, logger="cryptobot.exchange"):
        rep = e.ex.reconcile()
    assert not rep.ok and rep.unknown_orders[0]["clientOrderId"] == "human-order-1"
    assert "event=unknown_open_orders" in caplog.text and "human-order-1" in caplog.text
    assert e.emu.order(client_order_id="human-order-1")["status"] == "NEW"
    assert not e.ex.reconciled
    ct = e.emu.now.timestamp()
    ctx = e.ex.context(now=ct + 5, last_candle_close=ct, feature_fingerprint=FP, price=30_000.0)
    assert ctx.unknown_orders == 1
    d = e.g.approve(Signal(SYM, "buy", ct, FP), RiskEngine.from_settings(e.s).plan(30_000.0, ctx.equity, ctx.free_quote,
                                                                                  e.ex.market), ctx)
    assert isinstance(d, Denial) and Reason.UNRECONCILED_ORDERS in d.reasons
    e.client.cancel_order(foreign["id"], SYM)
    assert e.ex.reconcile().ok


# ------------------------------------------------------------------------------------------------ credentials
@pytest.mark.parametrize("case", ["wrong_key", "bad_signature", "clock_skew"])
def test_credential_errors_are_one_clear_line_without_secrets(tmp_path, emu, caplog, case):
    e = env_for(tmp_path, emu)
    a = approve(e)
    bad_key, bad_secret = "WRONGKEY-zz9912", "WRONGSECRET-kk7731"
    bad = make_client(api_key=bad_key if case == "wrong_key" else KEY,
                      api_secret=bad_secret if case == "bad_signature" else SECRET, base_url=emu.base_url)
    bad.load_markets()
    if case == "clock_skew":
        bad.options["timeDifference"] = 30_000                # our clock 30 s behind the exchange's window
    e.ex.venue = bad
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(ExchangeAuthError) as ei:
            e.ex.enter(a)
    msg = str(ei.value)
    assert "\n" not in msg and {"wrong_key": "-2015", "bad_signature": "-1022", "clock_skew": "-1021"}[case] in msg
    for s in (KEY, SECRET, bad_key, bad_secret):
        assert s not in msg and s not in caplog.text
    assert "signature=" not in caplog.text.replace("signature=****", "")
    assert emu.requests["POST /api/v3/order"] == 1 and emu.orders_created == 0    # sent once, never retried
    assert e.j.open_intents(SYM) == []                         # the intent is closed as rejected
    with pytest.raises(ExchangeAuthError):
        e.ex.reconcile()
    assert not e.ex.reconciled


# ------------------------------------------------------------------------------------------------ order queue
@pytest.mark.exclusive          # times the code: no other test runs meanwhile (conftest.py)
def test_order_queue_serialises_per_symbol_and_never_blocks(tmp_path):
    j = Journal(tmp_path / "j.sqlite")
    q = OrderQueue(journal=j)
    seen, t0 = [], time.perf_counter()

    def job(sym, i, dt=0.05):
        time.sleep(dt)
        seen.append((sym, i))
        return i

    futs = [q.submit("BTC/USDT", job, "BTC", i) for i in range(3)] + [q.submit("ETH/USDT", job, "ETH", 0)]
    assert time.perf_counter() - t0 < 0.03                     # submit returned at once
    assert [f.result(2) for f in futs] == [0, 1, 2, 0]
    assert [i for s, i in seen if s == "BTC"] == [0, 1, 2]
    assert seen.index(("ETH", 0)) < seen.index(("BTC", 2))      # another symbol does not wait behind BTC

    def boom():
        raise ccxt.ExchangeError('binance {"code":-1} url?timestamp=1&signature=abcdef0123456789')
    f = q.submit("BTC/USDT", boom)
    with pytest.raises(ccxt.ExchangeError):
        f.result(2)
    err = j.select("SELECT * FROM poll_errors")
    assert len(err) == 1 and err[0]["kind"] == "order_job" and "abcdef0123456789" not in err[0]["message"]

    running = q.submit("BTC/USDT", job, "BTC", 10, 0.3)
    queued = q.submit("BTC/USDT", job, "BTC", 11)
    time.sleep(0.05)
    q.close(wait=True, cancel_pending=True)                    # SIGTERM: finish the current job, drop the rest
    assert running.result(0) == 10 and queued.cancelled() and ("BTC", 11) not in seen
    with pytest.raises(Exception, match="closed"):
        q.submit("BTC/USDT", job, "BTC", 12)


def test_queue_runs_executor_work_off_the_loop(e, df):
    with OrderQueue(journal=e.j) as q:
        a = approve(e)
        fut = q.submit(SYM, e.ex.enter, a)
        res = fut.result(10)
        assert res.stop_client_order_id
        e.emu.advance(1)
        assert q.submit(SYM, e.ex.on_candle, df.iloc[e.emu.bar - 1]).result(10) == "protected"


# ------------------------------------------------------------------------------------------------ paper venue
def test_paper_executor_restart_restores_the_book(tmp_path, df):
    s = Settings(state_dir=tmp_path)
    now = {"t": df.index[1000].timestamp()}
    clock = MarketClock(lambda: now["t"])
    j = Journal(tmp_path / "journal.sqlite", clock=clock)
    g = Guardian(s, tmp_path, j, clock=clock)
    ex = PaperExecutor(j, g, df.iloc[:1000], price=df["open"].iloc[1000], settings=s, sleep=lambda _s: None, settle_s=0)
    assert ex.reconcile().ok
    ct = now["t"]
    ctx = ex.context(now=ct + 5, last_candle_close=ct, feature_fingerprint=FP, price=df["close"].iloc[999])
    a = g.approve(Signal(SYM, "buy", ct, FP), RiskEngine.from_settings(s).plan(df["close"].iloc[999], ctx.equity,
                                                                               ctx.free_quote, ex.market), ctx)
    res = ex.enter(a)
    assert res.stop_client_order_id and (tmp_path / "paper_book.json").exists()
    S = ex.position().stop_price                              # 1.5 % below the fill
    # the process stops; bar 1000 and a dip at bar 1001 close while it is down
    j.close()
    shape(df, 1001, low=S - 100)
    now["t"] = df.index[1002].timestamp()
    j2 = Journal(tmp_path / "journal.sqlite", clock=clock)
    g2 = Guardian(s, tmp_path, j2, clock=clock)
    ex2 = PaperExecutor(j2, g2, df.iloc[:1002], price=df["open"].iloc[1002], settings=s, sleep=lambda _s: None,
                        settle_s=0)
    rep = ex2.reconcile()
    assert rep.ok and ex2.position() is None
    [t] = j2.trades()
    assert t["exit_reason"] == "stop" and abs(t["exit_price"] - S) < 1e-9
    assert ex2.venue.engine.orders_created == 2


def test_order_queue_submit_does_not_deadlock_when_the_job_is_already_done():
    "A job that finishes before `submit` adds its done-callback ran the callback under the queue's lock (issue 10)."
    import threading
    q = OrderQueue()
    done = threading.Event()

    def submit_many():
        for k in range(300):                       # instant jobs: some finish before add_done_callback
            q.submit("BTC/USDT", int, k)
        done.set()
    threading.Thread(target=submit_many, daemon=True).start()
    assert done.wait(60), "OrderQueue.submit deadlocked on a job that was already done"
    assert q.drain(timeout=60) and q.pending() == 0
    q.close()
