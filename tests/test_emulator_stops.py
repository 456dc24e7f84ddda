"""The emulator's stops (issue 14) through the real ccxt client: STOP_LOSS (stop-market) where listed, the price moving
along the intrabar path on the clock (a stop triggers mid-candle), and the `stop_unfilled` fault."""
from __future__ import annotations

import ccxt
import numpy as np
import pandas as pd
import pytest

from cryptobot.client import make_client
from cryptobot.emulator import ORDER_TYPES, ORDER_TYPES_STOP_MARKET, Emulator, EmulatorError
from market import frame

KEY, SECRET = "emu-stop-key-1", "emu-stop-secret-1"
SYM = "BTC/USDT"


def _down_bar(df, i, stop):
    "Bar i: a down bar from the previous close through `stop` (2 % under it) and back up a little."
    o = float(df["close"].iloc[i - 1])
    low = stop * 0.98
    df.iloc[i, :5] = [o, o * 1.001, low, low * 1.002, 12.0]
    return o


@pytest.fixture
def rig():
    made = []

    def make(order_types=ORDER_TYPES_STOP_MARKET, shape=None):
        df = frame()
        if shape:
            shape(df)
        emu = Emulator(df, api_key=KEY, api_secret=SECRET, order_types=order_types).start()
        ex = make_client(api_key=KEY, api_secret=SECRET, base_url=emu.base_url)
        ex.load_markets()
        made.append(emu)
        return df, emu, ex
    yield make
    for e in made:
        e.stop()


def test_order_types_listed_and_served(rig):
    df, emu, ex = rig(order_types=ORDER_TYPES)
    assert ex.market(SYM)["info"]["orderTypes"] == ["LIMIT", "MARKET", "STOP_LOSS_LIMIT"]
    ex.create_order(SYM, "market", "buy", 0.01)
    with pytest.raises(ccxt.InvalidOrder):              # ccxt refuses a type the symbol does not list
        ex.create_order(SYM, "market", "sell", 0.005, None, {"stopLossPrice": 29_000})
    emu.list_order_types(ORDER_TYPES_STOP_MARKET)       # switched at run time, seen at the next exchangeInfo
    ex.load_markets(True)
    assert "STOP_LOSS" in ex.market(SYM)["info"]["orderTypes"]
    o = ex.create_order(SYM, "market", "sell", 0.005, None, {"stopLossPrice": 29_000})
    got = ex.fetch_order(o["id"], SYM)
    assert got["info"]["type"] == "STOP_LOSS" and got["status"] == "open" and got["triggerPrice"] == 29_000
    assert got["info"]["isWorking"] is False
    with pytest.raises(EmulatorError):
        emu.list_order_types(["MARKET"])


def test_stop_market_triggers_mid_candle_at_the_stop(rig):
    stop = 29_600.0
    df, emu, ex = rig(shape=lambda d: _down_bar(d, 1001, stop))
    ex.create_order(SYM, "market", "buy", 0.01)
    o = ex.create_order(SYM, "market", "sell", 0.00999, None, {"stopLossPrice": stop})
    emu.advance(1)                                       # bar 1001 opens above the stop
    t0 = emu.now
    assert ex.fetch_order(o["id"], SYM)["status"] == "open"
    emu.set_time(t0 + pd.Timedelta(minutes=59))          # its path has crossed the stop by now, mid-candle
    got = ex.fetch_order(o["id"], SYM)
    assert got["status"] == "closed" and got["average"] == pytest.approx(stop, abs=1e-8)
    trig = pd.Timestamp(got["info"]["workingTime"], unit="ms", tz="UTC")
    assert t0 < trig < t0 + pd.Timedelta(minutes=59)     # when the path reached the stop, not at the bar's close
    fill = [t for t in ex.fetch_my_trades(SYM) if t["order"] == o["id"]][0]
    assert fill["timestamp"] == got["info"]["workingTime"]


def test_stop_market_after_a_gap_fills_at_the_open(rig):
    "A bar that opens below the stop: the stop-market fills at that open (the backtest's min(stop, open))."
    stop = 29_600.0

    def gap(d):
        d.iloc[1001, :5] = [stop * 0.99, stop * 0.995, stop * 0.985, stop * 0.99, 12.0]
    df, emu, ex = rig(shape=gap)
    ex.create_order(SYM, "market", "buy", 0.01)
    o = ex.create_order(SYM, "market", "sell", 0.00999, None, {"stopLossPrice": stop})
    emu.advance(2)
    got = ex.fetch_order(o["id"], SYM)
    assert got["status"] == "closed" and got["average"] == pytest.approx(stop * 0.99, abs=1e-8)


def test_stop_limit_fault_triggers_without_filling(rig):
    "stop_unfilled: the stop-limit triggers mid-candle and rests unfilled (isWorking), as after a gap through L."
    stop = 29_600.0
    df, emu, ex = rig(order_types=ORDER_TYPES, shape=lambda d: _down_bar(d, 1001, stop))
    ex.create_order(SYM, "market", "buy", 0.01)
    o = ex.create_order(SYM, "limit", "sell", 0.00999, stop * 0.995, {"stopLossPrice": stop})
    emu.faults.add("stop_unfilled")
    emu.advance(1)
    emu.set_time(emu.now + pd.Timedelta(minutes=59))
    got = ex.fetch_order(o["id"], SYM)
    assert got["status"] == "open" and got["info"]["isWorking"] is True and got["filled"] == 0
    assert got["type"] == "limit" and got["triggerPrice"] == stop
    assert [f.fired for f in emu.faults.pending()] == [] and emu.faults.pending() == []


def test_market_order_mid_candle_fills_at_the_path_price(rig):
    "On the clock, a market order inside a bar fills at the price the path has reached (its open at the open)."
    df, emu, ex = rig(shape=lambda d: _down_bar(d, 1001, 29_600.0))
    emu.advance(1)
    at_open = ex.create_order(SYM, "market", "buy", 0.001)
    assert at_open["average"] == pytest.approx(float(df["open"].iloc[1001]) * 1.0005, rel=1e-9)
    emu.set_time(emu.now + pd.Timedelta(minutes=45))
    later = ex.create_order(SYM, "market", "sell", 0.0005)
    tape = next(iter(emu.tapes.values()))
    assert later["average"] == pytest.approx(tape.last_price(int(emu.now.value // 10**6)) * 0.9995, rel=1e-8)
    assert later["average"] < at_open["average"] * 0.99


def test_finer_candles_shape_the_path_inside_a_bar(rig):
    "path_candles (1m under 1h): a stop triggers in the minute whose candle crosses it, not where the 4-point path would."
    n_h = 1_100
    idx = pd.date_range("2024-01-01", periods=n_h * 60, freq="1min", tz="UTC", name="timestamp")
    px = np.full(len(idx), 30_000.0)
    k = 1_001 * 60 + 37                                  # minute 37 of bar 1001 dips 3 %, the rest is flat
    px[k] = 29_100.0
    m = pd.DataFrame({"open": px, "high": px, "low": px, "close": px, "volume": 1.0}, index=idx)
    m.iloc[k, m.columns.get_loc("open")] = 30_000.0
    m.iloc[k + 1, m.columns.get_loc("open")] = 29_100.0
    m["high"], m["low"] = m[["open", "close"]].max(axis=1), m[["open", "close"]].min(axis=1)
    hr = m.resample("1h").agg({"open": "first", "high": "max", "low": "min", "close": "last", "volume": "sum"})
    emu = Emulator(hr, api_key=KEY, api_secret=SECRET, order_types=ORDER_TYPES_STOP_MARKET, path_candles=m).start()
    try:
        ex = make_client(api_key=KEY, api_secret=SECRET, base_url=emu.base_url)
        ex.load_markets()
        ex.create_order(SYM, "market", "buy", 0.01)
        o = ex.create_order(SYM, "market", "sell", 0.00999, None, {"stopLossPrice": 29_500.0})
        emu.advance(1)
        bar_open = emu.now
        emu.set_time(bar_open + pd.Timedelta(minutes=37))
        assert ex.fetch_order(o["id"], SYM)["status"] == "open"          # not before minute 37
        emu.set_time(bar_open + pd.Timedelta(minutes=38))
        got = ex.fetch_order(o["id"], SYM)
        trig = pd.Timestamp(got["info"]["workingTime"], unit="ms", tz="UTC")
        assert got["status"] == "closed" and got["average"] == pytest.approx(29_500.0)
        assert bar_open + pd.Timedelta(minutes=37) <= trig < bar_open + pd.Timedelta(minutes=38)
    finally:
        emu.stop()
    with pytest.raises(EmulatorError, match="do not divide"):
        Emulator(hr, path_candles=hr.resample("2h").first().dropna())
