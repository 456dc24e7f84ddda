"""The stop is 1.5 % below the entry's FILL price, as the seed and freqtrade define it (issue 19), while the size is
still planned from the decision close: in the backtest's trade list, on the emulator after a live entry whose fill
is 2 % above the decision close, in the journal, and the stop watch, the reconciliation and the audit take that stop
for ours. The expected prices are computed here with decimals, independently of `RiskEngine.stop_for_fill`."""
from __future__ import annotations

from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

import numpy as np
import pandas as pd
import pytest

from cryptobot.client import make_client
from cryptobot.config import Settings
from cryptobot.emulator import ORDER_TYPES, Emulator
from market import frame
from runner_rig import KEY, SECRET, model  # noqa: F401 - `model` is a fixture

TICK = Decimal("0.01")


def dec(x) -> Decimal:
    "The decimal a number prints as."
    return Decimal(repr(float(x)))


def _floor(x: Decimal) -> Decimal:
    return (x / TICK).to_integral_value(rounding=ROUND_FLOOR) * TICK


def below(price, pct="1.5") -> Decimal:
    "The tick at or under `price` × (1 − pct %), `price` read as the decimal it prints as."
    return _floor(dec(price) * (1 - Decimal(pct) / 100))


def planned_from_close(close) -> Decimal:
    "The RiskEngine plan's stop: the close rounded up to the tick, 1.5 % below it, rounded down."
    return below((dec(close) / TICK).to_integral_value(rounding=ROUND_CEILING) * TICK)


def _walk(n, seed):
    "Candles whose next open is 0-1 % away from the close (gaps), so a fill's stop and a close's stop differ."
    rng = np.random.default_rng(seed)
    close = np.round(20_000 * np.exp(np.cumsum(rng.normal(0, 0.006, n))), 2)
    open_ = np.round(np.r_[20_000.0, close[:-1]] * (1 + rng.uniform(-0.01, 0.01, n)), 2)
    hi = np.maximum(open_, close) * (1 + np.abs(rng.normal(0, 0.004, n)))
    lo = np.minimum(open_, close) * (1 - np.abs(rng.normal(0, 0.004, n)))
    idx = pd.date_range("2024-01-01", periods=n, freq="h", tz="UTC", name="timestamp")
    return pd.DataFrame({"open": open_, "high": hi, "low": lo, "close": close, "volume": 1.0}, index=idx)


@pytest.mark.parametrize("slippage,sizing", [(0.0, "risk"), (0.0005, "risk"), (0.0005, "full")])
def test_backtest_trades_carry_the_stop_below_their_fill_and_the_size_of_the_close(slippage, sizing):
    from cryptobot.backtest import simulate_signals
    from cryptobot.risk import Market, RiskEngine
    cd = _walk(3_000, 7)
    rng = np.random.default_rng(8)
    en, ex = rng.random(len(cd)) < 0.08, rng.random(len(cd)) < 0.08
    tr = simulate_signals(cd, en, ex, RiskEngine(), Market(), 0.001, slippage, 10_000.0, sizing=sizing)
    assert len(tr) > 50
    o, c = cd["open"].to_numpy(), cd["close"].to_numpy()
    moved = 0
    for r in tr.itertuples():
        fill = o[r.entry_bar] * (1 + slippage)
        assert r.entry_price == fill
        assert dec(r.stop_price) == below(fill) and r.stop_price < fill                # from the FILL
        assert dec(r.stop_limit_price) == below(r.stop_price, "0.5")
        moved += dec(r.stop_price) != planned_from_close(c[r.entry_bar - 1])          # not the close's
        if r.exit_reason == "stop":
            assert r.exit_price == min(r.stop_price, o[r.exit_bar])
    assert moved >= 0.9 * len(tr), f"only {moved} of {len(tr)} stops differ from the decision close's"
    if sizing == "risk":                  # the size is still the plan made at the decision close
        from cryptobot.risk import Plan
        first = tr.iloc[0]
        plan = RiskEngine().plan(price=c[first.entry_bar - 1], equity=10_000.0, free_quote=10_000.0, market=Market())
        assert isinstance(plan, Plan) and first.amount == plan.amount and dec(plan.stop_price) != \
            dec(first.stop_price)


# ------------------------------------------------------------------------------------------------- live, emulator
@pytest.fixture
def gapped(tmp_path, model):
    """A stepped emulator (stop-limit market) whose entry bar opens 2 % above the decision close, and the real runner
    (paper mode, always long) that entered there."""
    from cryptobot.live import start_runner
    from cryptobot.model import ThresholdPolicy
    df = frame(1_300)
    o = round(float(df["close"].iloc[1_099]) * 1.02, 2)
    df.iloc[1_100, :4] = [o, round(o * 1.003, 2), round(o * 0.997, 2), round(o * 1.001, 2)]
    emu = Emulator(df, clock="stepped", start=1_100, api_key=KEY, api_secret=SECRET, order_types=ORDER_TYPES).start()
    s = Settings(state_dir=tmp_path / "st", exchange_url=emu.base_url, api_key=KEY, api_secret=SECRET, stop_check_s=60)

    def start():
        return start_runner(s, "paper", model, strategy=ThresholdPolicy(0.0, 0.0, 1000), max_model_age_days=None,
                            rate_limit_ms=1.0, executor_kw={"settle_s": 0.0, "sleep": lambda _s: None,
                                                            "retry": {"retries": 1}})
    box = {"r": start()}
    try:
        assert box["r"].step().outcome == "entered"
        yield emu, s, df, box, start
    finally:
        box["r"].close()
        box["r"].journal.close()
        emu.stop()


def test_live_stop_is_below_the_entry_fill_on_the_emulator_in_the_journal_and_is_ours(gapped):
    from cryptobot import audit as A
    from cryptobot.exchange import planned_stop, stop_differences
    emu, s, df, box, start = gapped
    r = box["r"]
    pos = r.executor.position()
    j = r.journal
    entry = emu.order(client_order_id=pos.entry_cid)
    avg = entry["average"]                                   # the exchange's average fill price of the entry
    close = float(df["close"].iloc[1_099])
    assert avg > close * 1.015                               # the fill is 2 % above the decision close
    S, L = below(avg), below(below(avg), "0.5")
    stop = emu.order(client_order_id=pos.stop_cid)
    assert stop["type"] == "STOP_LOSS_LIMIT" and stop["status"] == "NEW"
    assert (dec(stop["stop_price"]), dec(stop["price"])) == (S, L)   # on the exchange
    assert stop["stop_price"] < avg
    it = j.intent(pos.stop_cid)
    assert (dec(it["stop_price"]), dec(it["price"])) == (S, L)       # in the journal
    planned = j.intent(pos.entry_cid)                        # the plan: sized from the decision close
    assert dec(planned["stop_price"]) == planned_from_close(close) < S
    # the stop watch, the reconciliation and the audit compare the exchange's stop with the journal's: ours
    hand = make_client(api_key=KEY, api_secret=SECRET, base_url=emu.base_url)
    hand.load_markets()
    (raw,) = [o for o in hand.fetch_open_orders("BTC/USDT") if o["clientOrderId"] == pos.stop_cid]
    m = r.executor.market
    assert stop_differences(raw, planned_stop(it, price_tick=m.price_tick, amount_step=m.amount_step,
                                              open_amount=pos.open_amount)) == []
    emu.set_time(emu.now + pd.Timedelta(seconds=60))
    r.clock.sync()
    assert r.check_stop() == "protected"
    r.close()
    r.journal.close()
    box["r"] = r = start()                                   # the start-up reconciliation
    assert r.executor.reconciled and r.executor.last_report.ok, r.executor.last_report
    assert r.executor.position().stop_cid == pos.stop_cid    # kept, not replaced
    assert r.journal.select("SELECT COUNT(*) AS n FROM events WHERE kind = 'stop_mismatch'")[0]["n"] == 0
    with A.Evidence(s, backtest=False, env_files=[]) as ev:
        c = A.run_check("stops_on_exchange", ev)
    assert c.status == A.PASS, (c.detail, c.evidence)
    # and the stop fills where it stands: the bar after next trades 1 % under it
    i = emu.bar + 1
    low = float(S) * 0.99
    tape = next(iter(emu.tapes.values()))
    tape.set_bar(i, float(S) * 1.004, float(S) * 1.006, low, float(S) * 1.002, 12.0)
    for _ in range(3):
        emu.advance(1)
        r.step()
        r.queue.drain(60)
    (t,) = r.journal.trades()
    assert t["exit_reason"] == "stop" and t["entry_price"] == pytest.approx(avg, rel=1e-12)
