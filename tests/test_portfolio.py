"""Several symbols in one guarded bot: the Guardian's portfolio limits (real journal, real state dir) and a 3-symbol
paper run of the runner against the real emulator on 127.0.0.1 through the real `ccxt.binance` client."""
import dataclasses

import pytest

from cryptobot.config import Settings
from cryptobot.guardian import JOURNAL_FILE, Approval, Context, Guardian, Reason, Signal
from cryptobot.journal import Journal
from cryptobot.risk import Market

T = 1_704_070_800.0           # a candle close (2024-01-01 01:00 UTC)
SYMS = ("BTC/USDT", "ETH/USDT", "SOL/USDT")
PRICE = {"BTC/USDT": 42_000.0, "ETH/USDT": 2_000.0, "SOL/USDT": 100.0}


@pytest.fixture
def book(tmp_path):
    clock = [T + 10]

    def make(**kw):
        s = Settings(state_dir=tmp_path, symbols=SYMS, **kw)
        j = Journal(tmp_path / JOURNAL_FILE, clock=lambda: clock[0])
        return s, j, Guardian(s, tmp_path, j, clock=lambda: clock[0])
    yield make, clock


def ctx(free=10_000.0, equity=10_000.0, t=T):
    return Context(now=t + 10, last_candle_close=t, feature_fingerprint="fp", mode="paper", free_quote=free,
                   equity=equity, reconciled=True)


def enter(g, sym, c=None, t=T):
    c = c or ctx(t=t)
    plan = g.size_entry(sym, t, PRICE[sym], c, Market(symbol=sym))
    return plan, g.approve(Signal(sym, "buy", t, "fp"), plan, c)


def test_two_same_candle_entries_never_over_commit_cash(book):
    make, clock = book
    s, j, g = make(max_open_positions=3, max_total_risk_pct=5.0)
    p1, a1 = enter(g, "BTC/USDT")                  # risk-sized: 1 % risk at a 1.5 % stop = 6 667 notional
    assert isinstance(a1, Approval) and p1.limited_by == "risk"
    p2, a2 = enter(g, "ETH/USDT")                  # the first's fill has not come back: its cash is reserved
    assert isinstance(a2, Approval), a2
    assert p2.limited_by == "portfolio_cash" and p2.notional < p1.notional
    assert (p1.notional + p2.notional) * (1 + s.fee_pct / 100) <= 10_000.0
    p3, d3 = enter(g, "SOL/USDT")                  # nothing left: denied with its reason, journaled
    assert not d3 and Reason.CASH_COMMITTED in d3.reasons, d3
    assert j.decisions(1)[0]["approved"] is False and "cash_committed" in j.decisions(1)[0]["reasons"][0]
    # the same after a restart inside the candle: a fresh Guardian on the same journal reserves the same cash
    j.close()
    s, j, g2 = make(max_open_positions=3, max_total_risk_pct=5.0)
    assert g2.room("SOL/USDT", T, 10_000.0).reserved_quote == pytest.approx((p1.notional + p2.notional) * 1.001)


def test_max_open_positions_counts_filled_sent_and_approved_entries(book):
    make, clock = book
    s, j, g = make(max_open_positions=2, max_total_risk_pct=5.0)
    p1, a1 = enter(g, "BTC/USDT")
    g.redeem(a1)
    j.record_order_status(a1.client_order_id, "closed", "1", filled=p1.amount, average=p1.entry_price)
    clock[0] = T + 3600 + 10                       # the next candle: a filled position, nothing reserved
    p2, a2 = enter(g, "ETH/USDT", t=T + 3600)
    assert isinstance(a2, Approval) and p2.limited_by == "risk", p2
    p3, d3 = enter(g, "SOL/USDT", t=T + 3600)     # ETH approved but not yet sent: it holds the second slot
    assert not d3 and d3.reasons[0] is Reason.MAX_POSITIONS, d3
    assert "2 positions open or committed (limit 2)" in str(d3)


def test_total_open_risk_sizes_down_then_denies(book):
    make, clock = book
    s, j, g = make(max_open_positions=5, max_total_risk_pct=1.5)
    for sym, t in (("BTC/USDT", T), ("ETH/USDT", T + 3600), ("SOL/USDT", T + 7200)):
        clock[0] = t + 10
        plan, d = enter(g, sym, t=t)
        room = g.room(sym, t, 10_000.0)
        if sym == "BTC/USDT":                      # full size: 100 of the 150 budget
            assert d and plan.risk_amount == pytest.approx(100.0, rel=1e-3)
        elif sym == "ETH/USDT":                    # sized down to what is left: 50
            assert d and plan.limited_by == "portfolio_risk" and plan.risk_amount <= 50.0 + 1e-9, plan
            assert room.open_risk + 1e-9 >= 150.0 - 0.5
        else:                                      # no risk left: denied, with the reason
            assert not d and d.reasons == (Reason.TOTAL_RISK,), d
        if d:
            g.redeem(d)
            j.record_order_status(d.client_order_id, "closed", sym, filled=plan.amount, average=plan.entry_price)
    # every approved entry kept the total open risk within the limit
    assert g.room("SOL/USDT", T + 7200, 10_000.0).open_risk <= 150.0 * (1 + 1e-9)


def test_single_symbol_settings_are_unchanged(book):
    make, clock = book
    s = Settings()
    assert (s.symbols, s.max_open_positions, s.max_total_risk_pct) == (("BTC/USDT",), 3, 3.0)
    s, j, g = make()
    p, a = enter(g, "BTC/USDT")
    assert isinstance(a, Approval) and p == g.risk_engine.plan(PRICE["BTC/USDT"], 10_000.0, 10_000.0,
                                                               Market(symbol="BTC/USDT"), "BTC/USDT")


# ---------------------------------------------------------------------------------------------------- kill switches
def _trade(k, sym, pnl):
    from cryptobot.journal import ClosedTrade
    return ClosedTrade(trade_key=k, symbol=sym, entry_time=T - 7200, exit_time=T - 3600, entry_price=100.0,
                       exit_price=100.0 + pnl, amount=1.0, fees=0.2, pnl=pnl, exit_reason="stop")


def _cli(tmp_path, *args):
    import os
    import subprocess
    import sys
    from pathlib import Path
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CRYPTOBOT_", "BINANCE_")) and k != "GO_LIVE"}
    env.update(CRYPTOBOT_STATE_DIR=str(tmp_path), CRYPTOBOT_SYMBOLS=",".join(SYMS))
    return subprocess.run([str(Path(sys.executable).parent / "cryptobot"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_symbol_kill_switch_persists_and_only_unlock_symbol_lifts_it(book, tmp_path):
    make, clock = book
    s, j, g = make()
    for i, (sym, pnl) in enumerate([("ETH/USDT", -1.0), ("BTC/USDT", 3.0), ("ETH/USDT", -2.0), ("SOL/USDT", 1.0),
                                    ("ETH/USDT", -1.0)]):
        assert g.record_trade(_trade(f"t{i}", sym, pnl))
    assert not g.current_state.locked                          # the portfolio streak is 1
    p, d = enter(g, "ETH/USDT")
    assert not d and d.reasons == (Reason.KILL_SWITCH,) and "kill switch for ETH/USDT" in str(d)
    j.close()
    r = _cli(tmp_path, "status")                               # another process, after a "restart"
    assert r.returncode == 0 and "LOCKED     ETH/USDT: kill switch for ETH/USDT: 3 consecutive" in r.stdout, r
    s, j, g = make()                                           # a restarted Guardian: still locked, BTC still trades
    assert not enter(g, "ETH/USDT")[1] and enter(g, "BTC/USDT")[1]
    j.close()
    r = _cli(tmp_path, "unlock", "--symbol", "ETH/USDT", "--reason", "reviewed the ETH losses")
    assert r.returncode == 0 and "ETH/USDT unlocked by" in r.stdout, r
    s, j, g = make()
    assert enter(g, "ETH/USDT", t=T + 3600)[1]                 # lifted (a new candle: BTC's approval is history)
    assert j.last_events(1, kind="symbol_unlock")[0]["data"]["reason"] == "reviewed the ETH losses"


def test_portfolio_kill_switch_counts_losses_across_symbols(book, tmp_path):
    make, clock = book
    s, j, g = make()
    for i, sym in enumerate(SYMS):                             # one loss on each symbol: 3 in a row for the portfolio
        g.record_trade(_trade(f"p{i}", sym, -1.0))
    assert g.current_state.locked and g.current_state.lock_reason.startswith("kill switch: 3 consecutive losing")
    j.close()
    s, j, g = make()                                           # persistent (state.json and the journal agree)
    assert g.current_state.locked and j.rebuild_guardian_state()["lock"]["locked"]
    assert all(not enter(g, sym)[1] for sym in SYMS)
    j.close()
    r = _cli(tmp_path, "unlock", "--reason", "reviewed all three")
    assert r.returncode == 0 and r.stdout.startswith("unlocked by"), r
    s, j, g = make()
    assert not g.current_state.locked and enter(g, "SOL/USDT", t=T + 3600)[1]
