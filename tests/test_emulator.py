"""The emulator against the REAL ccxt.binance client on 127.0.0.1: market data, orders, fill rules, errors, faults."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from decimal import Decimal

import ccxt
import numpy as np
import pandas as pd
import pytest

from cryptobot.client import UnknownOutcome, call_with_retry, is_ban, make_client
from market import N, frame
from cryptobot.emulator import (DEFAULT_API_KEY, DEFAULT_API_SECRET, Emulator, EmulatorError, load_market)

SYM = "BTC/USDT"
KEY, SECRET = "test-key-7f3a", "test-secret-Zq91xv"




def shape(df: pd.DataFrame, i: int, **ohlc) -> pd.DataFrame:
    for k, v in ohlc.items():
        df.iloc[i, df.columns.get_loc(k)] = v
    return df


def ms(ts) -> int:
    return int(pd.Timestamp(ts).value // 10**6)


def d8(x) -> float:
    return float(Decimal(str(x)).quantize(Decimal("0.00000001")))


def px(x: float) -> float:
    "Round down to the 0.01 tick, like price_to_precision."
    return float(Decimal(str(x)).quantize(Decimal("0.01"), rounding="ROUND_DOWN"))


@pytest.fixture
def emu():
    with Emulator(frame(), api_key=KEY, api_secret=SECRET) as e:
        yield e


def client(emu, timeout_ms=10_000, key=KEY, secret=SECRET):
    ex = make_client(api_key=key, api_secret=secret, base_url=emu.base_url, timeout_ms=timeout_ms)
    ex.load_markets()
    return ex


@pytest.fixture
def ex(emu):
    return client(emu)


def no_secrets(exc: BaseException) -> None:
    text = f"{exc!s} {exc!r}"
    assert SECRET not in text and KEY not in text


# ---------------------------------------------------------------- market data
def test_load_markets_one_request_with_filters(emu, ex):
    assert emu.requests == {"GET /api/v3/exchangeInfo": 1}
    m = ex.market(SYM)
    assert m["spot"] and m["active"] and m["id"] == "BTCUSDT"
    assert m["precision"]["amount"] == 1e-5 and m["precision"]["price"] == 0.01
    assert m["limits"]["amount"] == {"min": 1e-5, "max": 9000.0}
    assert m["limits"]["cost"]["min"] == 5.0
    assert m["info"]["orderTypes"] == ["LIMIT", "MARKET", "STOP_LOSS_LIMIT"]


def test_fetch_ohlcv_pagination_and_forming_candle():
    df = frame()
    with Emulator(df, api_key=KEY, api_secret=SECRET) as emu:
        ex = client(emu)
        t = df.index
        page1 = ex.fetch_ohlcv(SYM, "1h", since=ms(t[0]), limit=1000)
        page2 = ex.fetch_ohlcv(SYM, "1h", since=page1[-1][0] + 3_600_000, limit=1000)
        assert [r[0] for r in page1] == [ms(x) for x in t[:1000]]
        assert [r[0] for r in page2] == [ms(t[1000])]                 # only candles that have started
        assert page1[10][1:] == [d8(df.open.iloc[10]), d8(df.high.iloc[10]), d8(df.low.iloc[10]),
                                 d8(df.close.iloc[10]), 12.0]
        forming = page2[0]
        assert forming[1:] == [d8(df.open.iloc[1000])] * 4 + [0.0]    # just opened: O=H=L=C, no volume
        last3 = ex.fetch_ohlcv(SYM, "1h", limit=3)
        assert [r[0] for r in last3] == [ms(x) for x in t[998:1001]]
        until = ex.fetch_ohlcv(SYM, "1h", limit=2, params={"until": ms(t[500])})
        assert [r[0] for r in until] == [ms(t[499]), ms(t[500])]
        with pytest.raises(ccxt.BadRequest):
            ex.fetch_ohlcv(SYM, "4h", limit=3)                         # only the emulator's timeframe

        emu.advance(1)                                                 # bar 1000 closed, 1001 forming
        last2 = ex.fetch_ohlcv(SYM, "1h", limit=2)
        assert last2[0][1:] == [d8(df.open.iloc[1000]), d8(df.high.iloc[1000]), d8(df.low.iloc[1000]),
                                d8(df.close.iloc[1000]), 12.0]
        assert last2[1][0] == ms(t[1001]) and last2[1][5] == 0.0

        emu.set_time(t[1001] + pd.Timedelta("30min"))                 # mid-bar: a partial candle
        o, h, l, c, v = ex.fetch_ohlcv(SYM, "1h", limit=1)[0][1:]
        bar = df.iloc[1001]
        assert o == d8(bar.open) and v == pytest.approx(6.0)
        assert l == pytest.approx(bar.low) and bar.open <= h < bar.high   # up bar: low first, high later
        assert l <= c <= h


def test_time_and_ticker(emu, ex):
    assert ex.fetch_time() == ms(emu.now)                               # the market clock
    tk = ex.fetch_ticker(SYM)
    o = frame().open.iloc[1000]
    assert tk["last"] == d8(o)
    assert tk["ask"] == pytest.approx(o * 1.0005) and tk["bid"] == pytest.approx(o * 0.9995)
    assert tk["timestamp"] == ms(emu.now)


# ---------------------------------------------------------------- orders and fills
def test_market_buy_and_sell_fill_rules(emu, ex):
    o = frame().open.iloc[1000]
    assert ex.fetch_balance()["USDT"] == {"free": 10_000.0, "used": 0.0, "total": 10_000.0}
    buy = ex.create_order(SYM, "market", "buy", 0.2, params={"clientOrderId": "e1-buy"})
    assert (buy["status"], buy["filled"], buy["clientOrderId"]) == ("closed", 0.2, "e1-buy")
    price = d8(o * 1.0005)
    assert buy["trades"][0]["price"] == price
    assert buy["fee"] == {"currency": "BTC", "cost": 0.0002}
    assert buy["average"] == pytest.approx(price, rel=1e-9)
    bal = ex.fetch_balance()
    assert bal["BTC"]["free"] == pytest.approx(0.1998, abs=1e-12)
    assert bal["USDT"]["free"] == pytest.approx(10_000 - d8(0.2 * price), abs=1e-8)

    emu.advance(1)
    o2 = frame().open.iloc[1001]
    sell = ex.create_order(SYM, "market", "sell", 0.1998)
    sp = d8(o2 * 0.9995)
    assert sell["trades"][0]["price"] == sp
    assert sell["fee"]["currency"] == "USDT"
    assert sell["fee"]["cost"] == pytest.approx(d8(0.1998 * sp) * 0.001, abs=1e-8)
    trades = ex.fetch_my_trades(SYM)
    assert [(t["side"], t["fee"]["currency"]) for t in trades] == [("buy", "BTC"), ("sell", "USDT")]
    assert emu.balances["BTC"] == {"free": 0.0, "locked": 0.0}
    assert [t["price"] for t in emu.trades] == [price, sp]


def test_quote_order_qty_market_buy(emu, ex):
    o = frame().open.iloc[1000]
    price = d8(o * 1.0005)
    r = ex.create_market_buy_order_with_cost(SYM, 500)
    qty = float(Decimal(str(500 / price)).quantize(Decimal("0.00001"), rounding="ROUND_DOWN"))
    assert r["filled"] == qty and r["cost"] <= 500
    assert r["info"]["origQuoteOrderQty"] == "500.00000000"


def _buy_and_stop(ex, o, qty=0.1, cid="stop-1"):
    ex.create_order(SYM, "market", "buy", qty)
    held = round(qty * 0.999, 8)
    S = px(o * 0.985)
    L = px(S * 0.995)
    sl = ex.create_order(SYM, "limit", "sell", held, L, {"stopLossPrice": S, "clientOrderId": cid})
    return held, S, L, sl


def test_stop_loss_limit_triggers_at_stop_on_a_later_bar():
    df = frame()
    o = df.open.iloc[1000]
    shape(df, 1001, low=df.open.iloc[1001] * 0.98)                       # dips through S, opened above it
    with Emulator(df, api_key=KEY, api_secret=SECRET) as emu:
        ex = client(emu)
        held, S, L, sl = _buy_and_stop(ex, o)
        assert sl["info"]["type"] == "STOP_LOSS_LIMIT" and sl["info"]["timeInForce"] == "GTC"
        assert sl["triggerPrice"] == S and sl["price"] == L and sl["type"] == "limit"
        assert emu.balances["BTC"]["locked"] == held
        assert [o_["id"] for o_ in ex.fetch_open_orders(SYM)] == [sl["id"]]
        emu.advance(1)                                                  # bar 1000: low 0.3 % down, no trigger
        q = ex.fetch_order(None, SYM, {"clientOrderId": "stop-1"})
        assert q["status"] == "open" and q["triggerPrice"] == S and q["info"]["isWorking"] is False
        emu.advance(1)                                                  # bar 1001 completes through S
        q = ex.fetch_order(sl["id"], SYM)
        assert (q["status"], q["filled"], q["average"]) == ("closed", held, S)
        t = ex.fetch_my_trades(SYM)[-1]
        assert t["price"] == S and t["order"] == sl["id"] and t["takerOrMaker"] == "taker"
        assert t["fee"] == {"currency": "USDT", "cost": d8(d8(held * S) * 0.001)}
        t0 = ms(df.index[1001])
        assert t0 < t["timestamp"] < t0 + 3_600_000                     # inside the bar that hit S
        assert emu.balances["BTC"] == {"free": 0.0, "locked": 0.0}
        assert ex.fetch_open_orders(SYM) == []


def test_stop_triggers_in_the_bar_it_was_placed_in():
    df = frame()
    o = df.open.iloc[1000]
    shape(df, 1000, low=o * 0.97)
    with Emulator(df, api_key=KEY, api_secret=SECRET) as emu:
        ex = client(emu)
        held, S, L, sl = _buy_and_stop(ex, o)
        emu.advance(1)
        q = ex.fetch_order(sl["id"], SYM)
        assert q["status"] == "closed" and q["average"] == S


def test_stop_gap_open_below_stop_fills_at_open():
    df = frame()
    o = df.open.iloc[1000]
    S = px(o * 0.985)
    gap_open = round(S * 0.998, 2)                                     # below S, above L = S * 0.995
    shape(df, 1001, open=gap_open, high=gap_open * 1.001, low=gap_open * 0.99, close=gap_open)
    with Emulator(df, api_key=KEY, api_secret=SECRET) as emu:
        ex = client(emu)
        held, S, L, sl = _buy_and_stop(ex, o)
        emu.advance(2)
        q = ex.fetch_order(sl["id"], SYM)
        assert q["status"] == "closed" and q["average"] == gap_open     # min(S, open)


def test_stop_gap_below_limit_rests_then_fills_at_limit():
    df = frame()
    o = df.open.iloc[1000]
    S = px(o * 0.985)
    L = px(S * 0.995)
    deep = round(L * 0.99, 2)
    shape(df, 1001, open=deep, high=deep * 1.002, low=deep * 0.99, close=deep)   # high < L: no fill
    shape(df, 1002, open=deep, high=L * 1.001, low=deep * 0.999, close=L)       # comes back to L
    with Emulator(df, api_key=KEY, api_secret=SECRET) as emu:
        ex = client(emu)
        held, S, L, sl = _buy_and_stop(ex, o)
        emu.advance(2)                                                  # triggered, below the limit
        q = ex.fetch_order(sl["id"], SYM)
        assert q["status"] == "open" and q["filled"] == 0.0 and q["info"]["isWorking"] is True
        assert q["info"]["workingTime"] >= ms(df.index[1001])
        assert emu.balances["BTC"]["locked"] == held
        emu.advance(1)
        q = ex.fetch_order(sl["id"], SYM)
        assert q["status"] == "closed" and q["average"] == L
        assert emu.trades[-1]["isMaker"] is True


def test_limit_order_rests_and_fills_at_limit(emu, ex):
    o = frame().open.iloc[1000]
    low_bid = px(o * 0.9985)                                            # bar 1000 low is o * 0.997
    r = ex.create_order(SYM, "limit", "buy", 0.01, low_bid, {"clientOrderId": "lim-1"})
    assert r["status"] == "open"
    assert emu.balances["USDT"]["locked"] == pytest.approx(d8(0.01 * low_bid))
    emu.advance(1)
    q = ex.fetch_order(r["id"], SYM)
    assert q["status"] == "closed" and q["average"] == low_bid
    assert emu.balances["USDT"]["locked"] == 0.0


def test_cancel_open_orders_and_client_id_queries(emu, ex):
    o = frame().open.iloc[1000]
    held, S, L, sl = _buy_and_stop(ex, o, cid="c-1")
    assert ex.fetch_order(None, SYM, {"clientOrderId": "c-1"})["id"] == sl["id"]
    c = ex.cancel_order(None, SYM, {"clientOrderId": "c-1"})
    assert c["status"] == "canceled" and c["info"]["origClientOrderId"] == "c-1"
    assert ex.fetch_open_orders(SYM) == []
    assert emu.balances["BTC"] == {"free": held, "locked": 0.0}
    assert emu.order(client_order_id="c-1")["status"] == "CANCELED"
    assert [x["status"] for x in ex.fetch_orders(SYM)] == ["closed", "canceled"]


# ---------------------------------------------------------------- Binance errors -> ccxt exceptions
def test_auth_errors_map_and_hide_secrets(emu):
    for key, secret in [("not-the-key", SECRET), (KEY, "not-the-secret")]:
        ex = make_client(api_key=key, api_secret=secret, base_url=emu.base_url)
        with pytest.raises(ccxt.AuthenticationError) as e:
            ex.fetch_balance()
        no_secrets(e.value)
        assert ("-2015" if key != KEY else "-1022") in str(e.value)


def test_timestamp_checked_against_wall_clock(emu, ex):
    wall = int(time.time() * 1000)
    for ts, text in [(wall - 20_000, "outside of the recvWindow"), (wall + 5_000, "ahead")]:
        with pytest.raises(ccxt.InvalidNonce) as e:
            ex.fetch_balance({"timestamp": ts})
        assert text in str(e.value)
        no_secrets(e.value)
    assert ex.fetch_balance()["USDT"]["free"] == 10_000.0             # market clock is 2024: still fine


@pytest.mark.parametrize("call, exc, text", [
    (lambda ex: ex.create_order(SYM, "market", "buy", 1.0), ccxt.InsufficientFunds, "insufficient balance"),
    (lambda ex: ex.create_order(SYM, "market", "sell", 0.01), ccxt.InsufficientFunds, "insufficient balance"),
    (lambda ex: ex.fetch_order("999", SYM), ccxt.OrderNotFound, "-2013"),
    (lambda ex: ex.fetch_order(None, SYM, {"clientOrderId": "nope"}), ccxt.OrderNotFound, "Order does not exist."),
    (lambda ex: ex.cancel_order("999", SYM), ccxt.OrderNotFound, "Unknown order sent."),
    (lambda ex: ex.create_order(SYM, "market", "buy", 10_000), ccxt.InvalidOrder, "LOT_SIZE"),      # > maxQty
    (lambda ex: ex.privatePostOrder({"symbol": "BTCUSDT", "side": "BUY", "type": "MARKET",
                                     "quantity": "0.000015"}), ccxt.InvalidOrder, "LOT_SIZE"),
    (lambda ex: ex.privatePostOrder({"symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT", "timeInForce": "GTC",
                                     "quantity": "0.001", "price": "29000.005"}), ccxt.InvalidOrder, "PRICE_FILTER"),
    (lambda ex: ex.create_order(SYM, "market", "buy", 0.0001), ccxt.BadRequest, "NOTIONAL"),       # $3 < $5
    (lambda ex: ex.create_order(SYM, "limit", "sell", 0.001, 40_000, {"stopLossPrice": 40_100}),
     ccxt.OrderImmediatelyFillable, "Stop price would trigger immediately."),
])
def test_order_errors_map_to_ccxt_exceptions(emu, ex, call, exc, text):
    with pytest.raises(exc) as e:
        call(ex)
    assert text in str(e.value)
    no_secrets(e.value)
    assert emu.orders_created == 0


def test_client_order_id_reuse_follows_binance_by_default(emu, ex):
    "Binance: a newClientOrderId is refused only while an earlier order with it is open (NEW, PARTIALLY_FILLED)."
    def reuse(cid, price=20_000):
        return ex.create_order(SYM, "limit", "buy", 0.01, price, {"clientOrderId": cid})
    ex.create_order(SYM, "market", "buy", 0.01, params={"clientOrderId": "dup-filled"})        # FILLED at once
    assert reuse("dup-filled")["status"] == "open"                                             # accepted again
    with pytest.raises(ccxt.InvalidOrder, match="Duplicate order sent."):                      # ... and now NEW
        reuse("dup-filled")
    emu.faults.add("partial", fraction=0.5)
    r = ex.create_order(SYM, "limit", "buy", 0.02, 31_000, {"clientOrderId": "dup-partial"})   # marketable, half fills
    assert emu.order(client_order_id="dup-partial")["status"] == "PARTIALLY_FILLED"
    with pytest.raises(ccxt.InvalidOrder, match="Duplicate order sent."):
        reuse("dup-partial")
    ex.cancel_order(r["id"], SYM)                                                              # CANCELED: not open
    assert reuse("dup-partial")["status"] == "open"
    emu.faults.add("partial", fraction=0.4)
    assert ex.create_order(SYM, "market", "buy", 0.05, params={"clientOrderId": "dup-exp"})["status"] == "expired"
    assert reuse("dup-exp")["status"] == "open"                                                # EXPIRED: not open
    with pytest.raises(ccxt.BadRequest, match="newClientOrderId"):
        ex.create_order(SYM, "market", "buy", 0.01, params={"clientOrderId": "has space"})
    by = [o["client_order_id"] for o in emu.orders]
    assert {c: by.count(c) for c in set(by)} == {"dup-filled": 2, "dup-partial": 2, "dup-exp": 2}
    assert emu.orders_created == 6


def test_client_order_id_never_reused_is_an_explicit_opt_in():
    with Emulator(frame(), api_key=KEY, api_secret=SECRET, unique_client_ids=True) as emu:
        ex = client(emu)
        ex.create_order(SYM, "market", "buy", 0.01, params={"clientOrderId": "dup-1"})      # FILLED
        with pytest.raises(ccxt.InvalidOrder, match="Duplicate order sent."):
            ex.create_order(SYM, "market", "buy", 0.01, params={"clientOrderId": "dup-1"})
        assert emu.orders_created == 1


# ---------------------------------------------------------------- faults
@pytest.mark.parametrize("fault, exc", [
    ({"kind": "rate_limit", "retry_after": 7}, ccxt.DDoSProtection),
    ({"kind": "ban"}, ccxt.DDoSProtection),
    ({"kind": "server_error", "status": 500}, ccxt.ExchangeNotAvailable),
    ({"kind": "server_error", "status": 502}, ccxt.ExchangeNotAvailable),
    ({"kind": "server_error", "status": 503}, ccxt.ExchangeNotAvailable),
    ({"kind": "server_error", "status": 504}, ccxt.RequestTimeout),
    ({"kind": "internal_error"}, ccxt.OperationFailed),
    ({"kind": "drop"}, ccxt.NetworkError),
])
def test_http_faults_on_reads(emu, ex, fault, exc):
    emu.faults.add(endpoint="klines", **fault)
    with pytest.raises(exc) as e:
        ex.fetch_ohlcv(SYM, "1h", limit=2)
    no_secrets(e.value)
    if fault["kind"] == "internal_error":
        assert not isinstance(e.value, ccxt.NetworkError)      # OperationFailed is NetworkError's parent
    if fault["kind"] == "rate_limit":
        assert ex.last_response_headers["Retry-After"] == "7" and not is_ban(e.value)
    if fault["kind"] == "ban":
        assert is_ban(e.value)
    assert len(ex.fetch_ohlcv(SYM, "1h", limit=2)) == 2                # one-shot: the next call works
    assert emu.requests["GET /api/v3/klines"] == 2 and emu.faults.pending() == []


def test_slow_response_times_out_but_the_order_executes(emu):
    ex = client(emu, timeout_ms=300)
    emu.faults.add("slow", endpoint="order", method="POST", delay=0.8)
    with pytest.raises(ccxt.RequestTimeout):
        ex.create_order(SYM, "market", "buy", 0.01, params={"clientOrderId": "slow-1"})
    assert emu.orders_created == 1
    assert emu.order(client_order_id="slow-1")["status"] == "FILLED"
    assert ex.fetch_order(None, SYM, {"clientOrderId": "slow-1"})["status"] == "closed"   # reconcile by id


def test_dropped_connection_does_not_execute(emu, ex):
    emu.faults.add("drop", endpoint="order", method="POST")
    with pytest.raises(ccxt.NetworkError):
        ex.create_order(SYM, "market", "buy", 0.01, params={"clientOrderId": "drop-1"})
    assert emu.orders_created == 0 and emu.requests["POST /api/v3/order"] == 1
    with pytest.raises(ccxt.OrderNotFound):
        ex.fetch_order(None, SYM, {"clientOrderId": "drop-1"})


def test_lost_response_executes_and_a_blind_retry_doubles_it(emu, ex):
    "Binance accepts a filled order's client id again: a blind resend after a lost response is a second order."
    emu.faults.add("lost", endpoint="order", method="POST")
    with pytest.raises(UnknownOutcome):
        call_with_retry(ex.create_order, SYM, "market", "buy", 0.01, params={"clientOrderId": "lost-1"},
                        idempotent=False, sleep=lambda s: None)
    assert emu.orders_created == 1 and emu.requests["POST /api/v3/order"] == 1
    assert ex.fetch_order(None, SYM, {"clientOrderId": "lost-1"})["filled"] == 0.01   # look it up: it filled
    ex.create_order(SYM, "market", "buy", 0.01, params={"clientOrderId": "lost-1"})   # the blind resend
    assert emu.orders_created == 2 and emu.balances["BTC"]["free"] == pytest.approx(0.02 * 0.999)


def test_partial_market_fill_expires_the_rest(emu, ex):
    emu.faults.add("partial", fraction=0.4)
    r = ex.create_order(SYM, "market", "buy", 0.05)
    assert (r["status"], r["filled"], r["amount"]) == ("expired", 0.02, 0.05)
    assert r["info"]["status"] == "EXPIRED"
    assert emu.balances["BTC"]["free"] == pytest.approx(0.02 * 0.999)
    assert ex.create_order(SYM, "market", "buy", 0.05)["filled"] == 0.05     # one-shot


def test_partial_stop_fill_rests_until_the_limit_trades():
    df = frame()
    o = df.open.iloc[1000]
    shape(df, 1001, low=df.open.iloc[1001] * 0.98)
    with Emulator(df, api_key=KEY, api_secret=SECRET) as emu:
        ex = client(emu)
        held, S, L, sl = _buy_and_stop(ex, o)
        emu.faults.add("partial", fraction=0.5)
        emu.advance(2)
        q = ex.fetch_order(sl["id"], SYM)
        half = float(Decimal(str(held / 2)).quantize(Decimal("0.00001"), rounding="ROUND_DOWN"))
        assert q["status"] == "open" and q["info"]["status"] == "PARTIALLY_FILLED" and q["filled"] == half
        assert emu.balances["BTC"]["locked"] == pytest.approx(held - half)
        emu.advance(1)                                                  # bar 1002 trades above L
        q = ex.fetch_order(sl["id"], SYM)
        assert q["status"] == "closed" and q["filled"] == held
        assert [t["price"] for t in ex.fetch_my_trades(SYM)][-2:] == [S, L]


def test_fault_switchboard_validation(emu):
    with pytest.raises(EmulatorError, match="unknown fault kind"):
        emu.faults.add("explode")
    with pytest.raises(EmulatorError, match="fraction"):
        emu.faults.add("partial", fraction=1.5)
    f = emu.faults.add("rate_limit", count=2)
    assert emu.faults.pending() == [f]
    emu.faults.clear()
    assert emu.faults.pending() == []


# ---------------------------------------------------------------- clock and lifecycle
def test_stepped_clock_bounds():
    df = frame(n=1010)
    with Emulator(df, api_key=KEY, api_secret=SECRET) as emu:
        assert emu.now == df.index[1000] and emu.bar == 1000
        with pytest.raises(EmulatorError, match="only moves forward"):
            emu.set_time(df.index[999])
        emu.advance(9)
        assert emu.bar == 1009 and not emu.finished
        emu.advance(1)                                                  # the last candle closes
        assert emu.finished
        with pytest.raises(EmulatorError, match="cannot advance"):
            emu.advance(1)
    with pytest.raises(EmulatorError, match="outside the candles"):
        Emulator(df, start="2030-01-01")
    with pytest.raises(EmulatorError, match="loopback"):
        Emulator(df, host="0.0.0.0")
    with pytest.raises(EmulatorError, match="UTC DatetimeIndex"):
        Emulator(df.reset_index())


def test_accelerated_clock_moves_bars_by_itself():
    df = frame()
    with Emulator(df, clock="accelerated", speed=36_000, api_key=KEY, api_secret=SECRET) as emu:
        ex = client(emu)
        t0 = ex.fetch_time()
        time.sleep(0.25)                                                # ~2.5 market hours
        t1 = ex.fetch_time()
        assert 2 * 3_600_000 <= t1 - t0 <= 6 * 3_600_000
        forming = ex.fetch_ohlcv(SYM, "1h", limit=1)[0]
        t2 = ex.fetch_time()
        assert t1 - 3_600_000 < forming[0] <= t2                       # the candle forming at that moment
        assert forming[5] > 0 or forming[0] == t2                      # partly formed: some volume


def test_stop_placed_mid_bar_ignores_the_low_made_before_it():
    df = frame()
    o = df.open.iloc[1000]
    shape(df, 1000, low=o * 0.97, high=o * 1.003, close=o * 1.001)   # up bar: O -> L (f~0.46) -> H -> C
    with Emulator(df, api_key=KEY, api_secret=SECRET) as emu:
        ex = client(emu)
        ex.create_order(SYM, "market", "buy", 0.1)
        emu.set_time(df.index[1000] + pd.Timedelta("55min"))            # back above the stop by now
        S, L = px(o * 0.985), px(o * 0.985 * 0.995)
        sl = ex.create_order(SYM, "limit", "sell", 0.0999, L, {"stopLossPrice": S})
        emu.advance(1)
        assert ex.fetch_order(sl["id"], SYM)["status"] == "open"       # the low came before placement


def test_order_test_endpoint_validates_without_trading(emu, ex):
    ex.create_order(SYM, "market", "buy", 0.01, params={"test": True})
    assert emu.orders_created == 0 and emu.trades == [] and emu.balances["USDT"]["free"] == 10_000.0
    with pytest.raises(ccxt.InsufficientFunds):
        ex.create_order(SYM, "market", "buy", 1.0, params={"test": True})


@pytest.mark.exclusive          # times the code: no other test runs meanwhile (conftest.py)
def test_loopback_latency_within_the_tick_budget(emu, ex):
    "Round trips through the real client with its rate limiter paced out (printed with -s)."
    def median_ms(fn, n=15):
        xs = []
        for _ in range(n):
            time.sleep(0.025)                                           # stay clear of ccxt's limiter
            t = time.perf_counter()
            fn()
            xs.append((time.perf_counter() - t) * 1000)
        return sorted(xs)[n // 2]
    ohlcv = median_ms(lambda: ex.fetch_ohlcv(SYM, "1h", limit=1000))
    order = median_ms(lambda: ex.create_order(SYM, "market", "buy", 0.001))
    print(f"loopback: fetch_ohlcv(1000) {ohlcv:.1f} ms, create_order(market) {order:.1f} ms")
    assert ohlcv < 20 and order < 20


def test_port_in_use_is_one_clear_line(emu):
    with pytest.raises(EmulatorError, match="cannot listen on 127.0.0.1"):
        Emulator(frame(), port=emu.port).start()


def test_run_emulator_cli_entry_serves_until_sigterm(tmp_path):
    code = ("from cryptobot.emulator import run_emulator; "
            "run_emulator(port=0, speed=3600, balances=['USDT=2500', 'BTC=0.5'])")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()
        assert line.startswith("emulator ready: http://127.0.0.1:"), line + proc.stderr.read()
        assert "synthetic" in line and "BTC/USDT 1h" in line and "speed 3600x" in line
        url = line.split()[2]
        ex = make_client(api_key=DEFAULT_API_KEY, api_secret=DEFAULT_API_SECRET, base_url=url)
        bal = ex.fetch_balance()
        assert bal["USDT"]["free"] == 2500.0 and bal["BTC"]["free"] == 0.5
        assert len(ex.fetch_ohlcv(SYM, "1h", limit=1000)) == 1000
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_default_market_is_the_labelled_synthetic_one():
    df = load_market()
    assert df.attrs["source"] == "synthetic" and len(df) == 43_776


def test_revoked_key_after_success_is_reported_by_ccxt_as_ddos(emu, ex):
    "ccxt quirk the exchange layer must know: -2015 after one authenticated call raises DDoSProtection."
    ex.fetch_balance()
    ex.apiKey = "revoked-key"
    with pytest.raises(ccxt.DDoSProtection) as e:
        ex.fetch_balance()
    assert "-2015" in str(e.value) and not is_ban(e.value)
    no_secrets(e.value)


def test_several_symbols_share_one_clock():
    btc, eth = frame(), frame()
    eth[["open", "high", "low", "close"]] /= 15
    with Emulator({"BTC/USDT": btc, "ETH/USDT": eth}, balances={"USDT": 5_000, "ETH": 1},
                  api_key=KEY, api_secret=SECRET) as emu:
        ex = client(emu)
        assert sorted(ex.markets) == ["BTC/USDT", "ETH/USDT"] and emu.requests["GET /api/v3/exchangeInfo"] == 1
        assert ex.fetch_ohlcv("ETH/USDT", "1h", limit=1)[0][1] == d8(eth.open.iloc[1000])
        r = ex.create_order("ETH/USDT", "market", "sell", 0.5)
        assert r["trades"][0]["price"] == pytest.approx(eth.open.iloc[1000] * 0.9995, abs=2e-8)
        assert emu.balances["ETH"]["free"] == 0.5 and emu.balances["BTC"]["free"] == 0.0
