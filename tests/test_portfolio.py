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


# ---------------------------------------------------------------------------------------------------- the runner
KEY, SECRET = "portfolio-key-0001", "portfolio-secret-0001"
N_BARS, START = 1_000, 640
OWN_FILTERS = {"ETH/USDT": {"step_size": "0.0001", "min_qty": "0.0001", "min_notional": "10"},
               "SOL/USDT": {"step_size": "0.01", "min_qty": "0.01", "tick_size": "0.001", "min_price": "0.001"}}


def _market(seeds):
    "Three symbols: BTC at ~10 000, ETH at ~1/20 and SOL at ~1/100 of it (per-symbol seeds; SOL on a 0.001 tick)."
    from cryptobot.data import synthetic_candles
    return {sym: synthetic_candles(n=N_BARS, seed=seed, start_price=10_000.0 / div, price_decimals=dec)
            for (sym, div, dec), seed in zip((("BTC/USDT", 1, 2), ("ETH/USDT", 20, 2), ("SOL/USDT", 100, 3)), seeds)}


def _paper_portfolio(tmp_path, candles, strat, **limits):
    from cryptobot.emulator import Emulator
    from cryptobot.live import start_portfolio
    from cryptobot.strategy import save_strategy_artifact
    emu = Emulator(candles, timeframe="1h", balances={"USDT": 10_000}, api_key=KEY, api_secret=SECRET,
                   clock="stepped", start=START, filters={k: v for k, v in OWN_FILTERS.items() if k in candles})
    emu.start()
    s = Settings(state_dir=tmp_path / "state", exchange_url=emu.base_url, api_key=KEY, api_secret=SECRET,
                 symbols=tuple(candles), kill_switch_losses=10, **limits)
    arts = {sym: save_strategy_artifact(strat, tmp_path / "art" / sym.replace("/", ""), symbol=sym,
                                        timeframe="1h").parent for sym in candles}
    try:
        pr = start_portfolio(s, "paper", arts, strategy=strat, settle_s=0.0, poll_s=0.02, min_poll_s=0.01,
                             executor_kw={"settle_s": 0.0, "sleep": lambda _s: None},
                             retry={"retries": 3, "base_delay": 0.05, "max_delay": 0.2}, rate_limit_ms=1.0)
    except BaseException:
        emu.stop()
        raise
    return emu, s, pr


def _open_risk(j):
    out = 0.0
    for p in j.open_positions():
        it = j.intent(p["client_order_id"])
        out += p["amount"] * (p["entry_price"] - it["stop_price"])
    return out


def _stepped(emu, pr, n, each=None):
    ticks = []
    for k in range(n):
        if k:
            emu.advance(1)
        before = emu.balances["USDT"]["free"]
        t = pr.step()
        ticks.append(t or {})
        if each is not None:
            each(k, before, t or {})
    pr.queue.drain(60)
    return ticks


def test_three_symbol_paper_run_on_the_emulator_trades_under_the_portfolio_limits(tmp_path):
    from cryptobot.strategy import make_strategy
    strat = make_strategy("ema_cross", {"fast": 3, "slow": 8})
    emu, s, pr = _paper_portfolio(tmp_path, _market((7, 11, 13)), strat, max_open_positions=2, max_total_risk_pct=1.5)
    j, seen = pr.journal, {"max_open": 0, "max_risk_pct": 0.0}

    def each(k, usdt_before, ticks):
        n_open = len(j.open_positions())
        eq = (j.select("SELECT equity FROM marks WHERE equity IS NOT NULL ORDER BY id DESC LIMIT 1") or [{"equity": 1e4}])[0]["equity"]
        seen["max_open"] = max(seen["max_open"], n_open)
        seen["max_risk_pct"] = max(seen["max_risk_pct"], _open_risk(j) / eq * 100)
        assert n_open <= 2, (k, j.open_positions())              # never more than CRYPTOBOT_MAX_OPEN_POSITIONS
    try:
        # each executor trades its own market: the emulator's per-symbol filters, through the real ccxt client
        steps = {r.symbol: r.executor.market.amount_step for r in pr.runners}
        assert steps == {"BTC/USDT": 1e-5, "ETH/USDT": 1e-4, "SOL/USDT": 0.01}, steps
        assert {type(r.executor.venue).__name__ for r in pr.runners} == {"binance"}
        ticks = _stepped(emu, pr, 250, each)
        assert all(len(t) == 3 for t in ticks), "every symbol decides on every candle close"
        decisions = j.decisions(10_000)
        approved = [d for d in decisions if d["approved"]]
        denied = [d for d in decisions if not d["approved"]]
        reasons = {r.split(" ")[0] for d in denied for r in d["reasons"]}
        trades = j.trades()
        print(f"approved {len(approved)} denied {len(denied)} reasons {sorted(reasons)} trades {len(trades)} "
              f"max open {seen['max_open']} max open risk {seen['max_risk_pct']:.3f}% of equity")
        assert {d["symbol"] for d in approved} == set(SYMS), "every symbol traded"
        assert len(trades) >= 10 and {t["symbol"] for t in trades} == set(SYMS)
        assert seen["max_open"] == 2, "the position limit was reached"
        assert reasons & {"max_open_positions", "total_risk_limit"}, reasons   # and it denied entries
        assert any(d["plan"]["limited_by"] == "portfolio_risk" for d in approved), "an entry was sized down"
        # open risk (actual fills) within the 1.5 % budget, up to the fills' slippage above the planned entry
        assert seen["max_risk_pct"] <= 1.5 * (1 + 0.05), seen
        assert not j.select("SELECT 1 FROM orders WHERE status = 'rejected'"), "no order refused by the exchange"
        for r in pr.runners:                                    # every open position has its stop on the exchange
            pos = r.executor.position()
            if pos is not None:
                assert emu.order(client_order_id=pos.stop_cid)["status"] == "NEW", pos
    finally:
        pr.close()
        j.close()
        emu.stop()


@pytest.mark.parametrize("risk_pct,second", [(1.0, "sized"), (2.0, "denied")])
def test_same_candle_entries_through_the_runner_never_over_commit_cash(tmp_path, risk_pct, second):
    """BTC and ETH on the same price path (ETH = BTC/20): they enter on the same candles. 1 % risk at a 1.5 % stop is
    2/3 of the cash each: the second is sized on the third the first left. 2 % wants all of it (the leverage cap): the
    second is denied (cash_committed)."""
    from cryptobot.data import synthetic_candles
    from cryptobot.strategy import make_strategy
    btc = synthetic_candles(n=N_BARS, seed=5)
    eth = btc.copy()
    eth[["open", "high", "low", "close"]] = (eth[["open", "high", "low", "close"]] / 20).round(2)
    strat = make_strategy("ema_cross", {"fast": 3, "slow": 8})
    emu, s, pr = _paper_portfolio(tmp_path, {"BTC/USDT": btc, "ETH/USDT": eth}, strat, risk_pct=risk_pct,
                                  max_open_positions=3, max_total_risk_pct=5.0)
    j, both = pr.journal, []

    def each(k, usdt_before, ticks):
        ct = {t.candle_time for t in ticks.values()}
        rows = [d for d in j.decisions(10) if d["candle_time"] in ct and d["approved"]]
        if len(rows) == 2:
            both.append(rows)
            spent = sum(d["plan"]["notional"] for d in rows) * (1 + s.fee_pct / 100)
            assert spent <= usdt_before * (1 + 1e-9), (k, spent, usdt_before, rows)
            assert rows[1]["plan"]["limited_by"] == "portfolio_cash", rows[1]["plan"]
    try:
        _stepped(emu, pr, 150, each)
        entries = [d for d in j.decisions(10_000) if d["plan"] and d["candle_time"]]
        same = {}
        for d in entries:
            same.setdefault(d["candle_time"], []).append(d)
        pairs = [v for v in same.values() if len(v) == 2]
        print(f"candles with two entry decisions: {len(pairs)}, both approved: {len(both)}")
        assert pairs, "the two symbols never signalled on the same candle"
        for v in pairs:                                         # the second: sized down on what was left, or denied
            d2 = v[1]
            assert d2["approved"] and d2["plan"]["limited_by"] == "portfolio_cash" or \
                (not d2["approved"] and any(r.startswith("cash_committed") for r in d2["reasons"])), d2
        assert (len(both) == len(pairs)) if second == "sized" else (both == []), (len(both), len(pairs))
        assert not j.select("SELECT 1 FROM orders WHERE status = 'rejected'"), "no order refused for lack of funds"
    finally:
        pr.close()
        j.close()
        emu.stop()
