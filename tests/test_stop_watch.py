"""The stop between candle closes (issue 14): stop-market where the symbol lists STOP_LOSS, the runner's stop watch on
the emulator's accelerated clock (a gap through a stop-limit mid-candle, a stop-market fill mid-candle and the kill
switch, a stop cancelled by hand), with the real ccxt client, real SQLite and the real runner loop."""
from __future__ import annotations

import time

import pandas as pd
import pytest

from cryptobot.client import make_client
from cryptobot.config import Settings
from cryptobot.emulator import ORDER_TYPES_STOP_MARKET, Emulator
from cryptobot.live import start_runner
from market import frame
from runner_rig import KEY, SECRET, Rig, model  # noqa: F401 - `model` is a fixture

CHECK_S = 60             # the stop check interval (exchange seconds)


@pytest.fixture
def rig_factory(tmp_path, model):
    rigs = []

    def make(*, stop_market: bool, stop_order: str = "auto", kill: int = 3):
        r = Rig(tmp_path / f"r{len(rigs)}", model, stop_market=stop_market,
                settings={"stop_check_s": CHECK_S, "stop_order": stop_order, "kill_switch_losses": kill})
        rigs.append(r)
        return r
    yield make
    for r in rigs:
        r.close()


def test_stop_market_where_listed_stop_limit_otherwise(rig_factory):
    "auto: STOP_LOSS when orderTypes list it, STOP_LOSS_LIMIT otherwise; the journal keeps the type."
    for market, want in ((True, "STOP_LOSS"), (False, "STOP_LOSS_LIMIT")):
        r = rig_factory(stop_market=market)
        st = r.wait_for(r.stop_order, "the stop after the entry")
        assert st["type"] == want and r.runner.executor.stop_type == ("market" if market else "limit")
        intent = r.runner.journal.select("SELECT type, price FROM intents WHERE purpose = 'stop'")[0]
        assert intent["type"] == want.lower() and (intent["price"] is None) == market
        r.close()


def test_forced_stop_type_refused_when_not_listed(tmp_path, model):
    "CRYPTOBOT_STOP_ORDER=market on a symbol without STOP_LOSS: refused at start, one line, nothing sent."
    emu = Emulator(frame(1_300), clock="stepped", start=1_100, api_key=KEY, api_secret=SECRET)
    emu.start()
    try:
        s = Settings(state_dir=tmp_path / "st", exchange_url=emu.base_url, api_key=KEY, api_secret=SECRET,
                     stop_order="market")
        from cryptobot.live import StartupRefused
        with pytest.raises(StartupRefused, match="does not list STOP_LOSS"):
            start_runner(s, "paper", model, max_model_age_days=None, rate_limit_ms=1.0)
        assert emu.orders_created == 0
    finally:
        emu.stop()


@pytest.mark.exclusive          # times the code: no other test runs meanwhile (conftest.py)
def test_gap_through_stop_limit_mid_candle_ends_in_emergency_exit(rig_factory):
    "A stop-limit triggers mid-candle without filling: the watch sells at market within one check interval."
    r = rig_factory(stop_market=False)
    st = r.wait_for(r.stop_order, "the stop after the entry")
    r.emu.faults.add("stop_unfilled")
    i, bar_open = r.crash_next_bar(st)
    unp = r.wait_for(lambda: r.events("unprotected"), "the emergency exit", 60)
    d = unp[0][3]
    assert d["cause"] == "stop_unfilled"
    stop_now = r.emu.order(client_order_id=st["client_order_id"])
    trigger = stop_now["update_time"] / 1000.0
    assert bar_open < trigger < bar_open + 3600                      # it triggered inside the candle
    exits = [o for o in r.emu.orders if o["client_order_id"] != st["client_order_id"] and o["side"] == "SELL"]
    assert len(exits) == 1 and exits[0]["type"] == "MARKET" and exits[0]["status"] == "FILLED"
    exit_t = exits[0]["time"] / 1000.0
    assert exit_t < bar_open + 3600                                   # before the candle closed
    # within one check interval of exchange time (+ the exchange time one loop pass takes at this speed)
    print(f"stop-limit gap: trigger -> emergency exit {exit_t - trigger:.1f} s of exchange time (check every {CHECK_S} s)")
    assert exit_t - trigger <= CHECK_S * 1.5, (exit_t - trigger)
    assert abs(d["seconds"] - (d["end"] - d["start"])) < 1e-6 and d["seconds"] <= CHECK_S * 1.5
    trade = r.runner.journal.trades()[0]
    assert trade["exit_reason"] == "stop_unfilled"


def test_stop_market_fills_at_the_trigger_and_updates_the_kill_switch(rig_factory):
    "The same candle with a stop-market: filled at the stop, no unprotected time, kill switch set before the close."
    r = rig_factory(stop_market=True, kill=1)
    st = r.wait_for(r.stop_order, "the stop after the entry")
    assert st["type"] == "STOP_LOSS"
    i, bar_open = r.crash_next_bar(st)
    locks = r.wait_for(lambda: r.rows("SELECT * FROM locks"), "the kill switch", 60)
    fill = r.emu.order(client_order_id=st["client_order_id"])
    assert fill["status"] == "FILLED" and abs(fill["average"] - st["stop_price"]) < 1e-6   # at the trigger
    trade = r.runner.journal.trades()[0]
    assert trade["exit_reason"] == "stop" and trade["pnl"] < 0
    assert bar_open < trade["exit_time"] < bar_open + 3600
    assert locks[0]["ts"] < bar_open + 3600                          # the kill switch, before the candle closed
    print(f"stop-market fill {trade['exit_time'] - bar_open:.0f} s into the candle -> kill switch "
          f"{locks[0]['ts'] - trade['exit_time']:.1f} s later, {bar_open + 3600 - locks[0]['ts']:.0f} s before the close")
    assert r.runner.guardian.locked and "kill switch" in r.runner.guardian.current_state.lock_reason
    assert r.events("unprotected") == []
    checks = [e for e in r.events("stop_check") if e[3]["result"] == "stopped_out"]
    assert checks and bar_open < checks[0][3]["t"] < bar_open + 3600


@pytest.mark.exclusive          # times the code: no other test runs meanwhile (conftest.py)
def test_stop_cancelled_by_hand_is_replaced_within_one_interval(rig_factory):
    r = rig_factory(stop_market=True)
    st = r.wait_for(r.stop_order, "the stop after the entry")
    hand = make_client(api_key=KEY, api_secret=SECRET, base_url=r.emu.base_url)
    hand.load_markets()
    hand.cancel_order(None, "BTC/USDT", {"clientOrderId": st["client_order_id"]})
    cancelled = r.emu.order(client_order_id=st["client_order_id"])
    assert cancelled["status"] == "CANCELED"
    unp = r.wait_for(lambda: r.events("unprotected"), "the replacement stop", 60)
    d = unp[0][3]
    new = r.emu.order(client_order_id=d["stop"])
    assert d["cause"] == "stop_cancelled" and new["status"] == "NEW" and new["type"] == "STOP_LOSS"
    assert abs(d["start"] - cancelled["update_time"] / 1000.0) < 1e-6
    print(f"cancelled by hand -> new stop {new['time'] / 1000.0 - d['start']:.1f} s of exchange time")
    assert new["time"] / 1000.0 - d["start"] <= CHECK_S * 1.5, new["time"] / 1000.0 - d["start"]
    assert r.runner.journal.last_events(1, kind="stop_replaced")
    intent = r.runner.journal.intent(d["stop"])
    assert intent["purpose"] == "stop" and intent["type"] == "stop_loss"


def test_unknown_stop_state_is_retried_then_locks_entries(tmp_path, model):
    """Stop checks that fail (5xx on GET order): retried; after two intervals new entries are locked, and why; a check
    that succeeds again reconciles and lifts it."""
    from cryptobot.model import ThresholdPolicy
    emu = Emulator(frame(1_300), clock="stepped", start=1_100, api_key=KEY, api_secret=SECRET,
                   order_types=ORDER_TYPES_STOP_MARKET).start()
    try:
        s = Settings(state_dir=tmp_path / "st", exchange_url=emu.base_url, api_key=KEY, api_secret=SECRET,
                     stop_check_s=CHECK_S)
        r = start_runner(s, "paper", model, strategy=ThresholdPolicy(0.0, 0.0, 1000), max_model_age_days=None,
                         rate_limit_ms=1.0, executor_kw={"settle_s": 0.0, "sleep": lambda _s: None,
                                                         "retry": {"retries": 1}})
        assert r.step().outcome == "entered" and r.next_check is not None
        emu.set_time(emu.now + pd.Timedelta(seconds=CHECK_S))
        r.clock.sync()                                                     # the run loop's wait syncs before a check
        assert r.check_stop() == "protected" and r.last_check == pytest.approx(emu.now.timestamp(), abs=5)
        emu.faults.add("server_error", count=1000, endpoint="order", method="GET")
        for k in range(4):                                                # unknown for 0, 60, 120, 180 s
            emu.set_time(emu.now + pd.Timedelta(seconds=CHECK_S))
            r.clock.sync()
            assert r.check_stop() == "unknown"
            assert r.next_check - r.clock() <= CHECK_S / 4 + 1e-6       # retried sooner than the interval
        assert r.executor.reconciled is False                            # entries are locked ...
        why = r.journal.last_events(1, kind="stop_unknown")[0]["message"]
        assert "has been unknown for" in why and "new entries are locked" in why   # ... and it says why
        ctx = r.executor.context(now=r.clock(), last_candle_close=r.last_done, feature_fingerprint=r.fp, price=30_000)
        assert ctx.reconciled is False
        emu.faults.clear()
        emu.set_time(emu.now + pd.Timedelta(seconds=CHECK_S))
        r.clock.sync()
        assert r.check_stop() == "protected" and r.executor.reconciled is True and r.unknown_since is None
        results = [e["data"]["result"] for e in r.journal.last_events(10, kind="stop_check")]
        assert results[-6:] == ["protected", "unknown", "unknown", "unknown", "unknown", "protected"]
        r.close()
        r.journal.close()
    finally:
        emu.stop()


def _journal_with_unprotected(tmp_path, seconds: float, now: float):
    from cryptobot.journal import Journal
    s = Settings(state_dir=tmp_path / "st", stop_check_s=CHECK_S)
    s.state_dir.mkdir(parents=True)
    with Journal(s.state_dir / "journal.sqlite") as j:
        j.record_intent("cbs-1", s.symbol, "sell", "stop_loss_limit", 0.01, price=29_000.0, stop_price=29_100.0,
                        purpose="stop", candle_time=now - 7200)
        j.log_event("stop_check", "protected", {"t": now - 30, "result": "protected", "interval_s": CHECK_S,
                                                "stop_type": "limit"})
        j.log_event("unprotected", "x", {"entry": "cbe-1", "cause": "stop_unfilled", "start": now - 3600,
                                         "end": now - 3600 + seconds, "seconds": seconds, "stop": None})
    return s


@pytest.mark.parametrize("seconds,fails", [(90.0, False), (2 * CHECK_S + 1, True)])
def test_audit_fails_on_unprotected_longer_than_two_intervals(tmp_path, seconds, fails):
    from cryptobot import audit as A
    now = time.time()
    s = _journal_with_unprotected(tmp_path, seconds, now)
    c = A.run_check("stops_on_exchange", A.Evidence(s, now=now, ask_exchange=False))
    assert (c.status == A.FAIL) == fails, c
    if fails:
        assert "cbe-1 stop_unfilled 121 s" in c.evidence and "two stop-check intervals (120 s)" in c.evidence


def test_status_and_dashboard_show_the_stop(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path
    from cryptobot.monitor import snapshot, status_html
    now = time.time()
    s = _journal_with_unprotected(tmp_path, 300.0, now)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CRYPTOBOT_", "BINANCE_"))}
    out = subprocess.run([str(Path(sys.executable).parent / "cryptobot"), "status"], cwd=tmp_path, text=True,
                         env=dict(env, CRYPTOBOT_STATE_DIR=str(s.state_dir)), capture_output=True, check=True).stdout
    line = [l for l in out.splitlines() if l.startswith("stop ")][0]
    assert "STOP_LOSS_LIMIT (stop-limit)" in line and "protected" in line and "every 60 s" in line
    assert "UNPROTECTED 1x, longest 300 s (last: stop_unfilled" in line
    html = status_html(snapshot(s, now=now))
    assert 'id="cbm-stop">STOP_LOSS_LIMIT<' in html and "unprotected 1x, longest 5 min" in html


def test_bench_reports_the_cost_of_a_stop_check(model):
    from cryptobot.parity import bench_stop_check
    b = bench_stop_check(model, frame(1_300), n_checks=20)
    assert b["stop_check_requests"] == {"GET /api/v3/order": 1.0}      # one order query per check, nothing else
    assert b["stop_check_weight"] == 4 and b["stop_check_weight_per_hour"] == 240.0
    assert b["stop_check_ms"] > 0
