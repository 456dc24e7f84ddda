"""Several symbols in one guarded bot: the Guardian's portfolio limits (real journal, real state dir) and a 3-symbol
paper run of the runner against the real emulator on 127.0.0.1 through the real `ccxt.binance` client."""
import dataclasses
import json

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
    assert (p1.notional + p2.notional) * g.cash_factor <= 10_000.0   # notional, fee and slippage allowance
    p3, d3 = enter(g, "SOL/USDT")                  # nothing left: denied with its reason, journaled
    assert not d3 and Reason.CASH_COMMITTED in d3.reasons, d3
    assert j.decisions(1)[0]["approved"] is False and "cash_committed" in j.decisions(1)[0]["reasons"][0]
    # the same after a restart inside the candle: a fresh Guardian on the same journal reserves the same cash
    j.close()
    s, j, g2 = make(max_open_positions=3, max_total_risk_pct=5.0)
    assert g2.room("SOL/USDT", T, 10_000.0).reserved_quote == pytest.approx((p1.notional + p2.notional) * g2.cash_factor)


from hypothesis import given, settings as hsettings, strategies as st  # noqa: E402


@hsettings(max_examples=120, deadline=None)
@given(prices=st.tuples(*[st.floats(0.05, 90_000.0) for _ in SYMS]),
       fee=st.sampled_from([0.0, 0.075, 0.1, 0.5, 1.0]), slip=st.sampled_from([0.0, 0.05, 0.3, 1.0, 2.0]),
       free=st.floats(20.0, 50_000.0), risk=st.sampled_from([0.3, 0.5, 0.6, 1.0, 2.0]),
       fills=st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3), order=st.permutations(SYMS))
def test_same_candle_cash_committed_with_fees_and_slippage_never_exceeds_free_quote(prices, fee, slip, free, risk,
                                                                                     fills, order):
    """Three entries on one candle, sized and approved by the Guardian in any order, at any prices, fees, slippage
    allowances and balances; some fill (at up to the allowance above the planned entry) before the next is sized.
    The cash committed — what a fill took, or notional × (1 + fee)(1 + slippage allowance) for an entry not back
    yet — never exceeds the free quote the context reported before the candle's first entry."""
    import tempfile
    from pathlib import Path
    from cryptobot.risk import Plan
    d = Path(tempfile.mkdtemp())
    s = Settings(state_dir=d, symbols=SYMS, fee_pct=fee, slippage_pct=slip, risk_pct=risk, max_open_positions=3,
                 max_total_risk_pct=5.0)
    j = Journal(d / JOURNAL_FILE, clock=lambda: T + 10)
    g, c = Guardian(s, d, j, clock=lambda: T + 10), ctx(free=free, equity=free)
    factor, committed = (1 + fee / 100) * (1 + slip / 100), []
    try:
        for k, sym in enumerate(order):
            mk = Market(symbol=sym, amount_step=1e-5 if prices[SYMS.index(sym)] > 100 else 1e-2, min_notional=5.0,
                        min_amount=1e-5 if prices[SYMS.index(sym)] > 100 else 1e-2)
            plan = g.size_entry(sym, T, prices[SYMS.index(sym)], c, mk)
            if type(plan) is not Plan:
                continue
            a = g.approve(Signal(sym, "buy", T, "fp"), plan, c)
            if not a:
                continue
            if fills[k] > 0.5:                 # filled at up to the allowance above the plan; fee in base
                px = plan.entry_price * (1 + slip / 100 * (fills[k] - 0.5) * 2)
                g.redeem(a)
                j.record_order_status(a.client_order_id, "closed", f"x{k}", filled=plan.amount, average=px)
                j.record_fill(f"t{k}", a.client_order_id, px, plan.amount, plan.amount * fee / 100,
                              sym.split("/")[0], symbol=sym, side="buy")
                committed.append(px * plan.amount)
            else:
                committed.append(plan.notional * factor)
            assert sum(committed) <= free * (1 + 1e-9), (k, sym, committed, free, plan)
    finally:
        j.close()


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


def _paper_portfolio(tmp_path, candles, strat, usdt=10_000, **limits):
    from cryptobot.emulator import Emulator
    from cryptobot.live import start_portfolio
    from cryptobot.strategy import save_strategy_artifact
    costs = {k: limits[k] for k in ("fee_pct", "slippage_pct") if k in limits}   # the exchange charges what the bot plans
    emu = Emulator(candles, timeframe="1h", balances={"USDT": usdt}, api_key=KEY, api_secret=SECRET,
                   clock="stepped", start=START, filters={k: v for k, v in OWN_FILTERS.items() if k in candles}, **costs)
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


@pytest.mark.parametrize("risk_pct,second", [(1.0, "sized"), (2.0, "leftover")])
def test_same_candle_entries_through_the_runner_never_over_commit_cash(tmp_path, risk_pct, second):
    """BTC and ETH on the same price path (ETH = BTC/20): they enter on the same candles. 1 % risk at a 1.5 % stop is
    2/3 of the cash each: the second is sized on the third the first left. 2 % wants all of it (the cash cap, with the
    fee and the slippage allowance): the second is denied (cash_committed), or sized on the part of the first's
    allowance its fill did not use (a fill that took less than the worst case leaves real cash)."""
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
            # the first filled before the second was sized: what its fills took, then the second's notional with its
            # fee and slippage allowance
            took = sum(f["price"] * f["amount"] for f in j.fills(rows[0]["client_order_id"]))
            spent = took + rows[1]["plan"]["notional"] * pr.guardian.cash_factor
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
        if second == "sized":
            assert len(both) == len(pairs), (len(both), len(pairs))
        else:                                                   # at most what the first's allowance left: ~0.1 %
            assert all(r[1]["plan"]["notional"] < 0.002 * r[0]["plan"]["notional"] for r in both), both
        assert not j.select("SELECT 1 FROM orders WHERE status = 'rejected'"), "no order refused for lack of funds"
    finally:
        pr.close()
        j.close()
        emu.stop()


def _same_path(n=N_BARS, seed=5, names=SYMS):
    "BTC, ETH = BTC/20 and SOL = BTC/100 on one price path: they signal on the same candles."
    from cryptobot.data import synthetic_candles
    btc = synthetic_candles(n=n, seed=seed)
    out = {}
    for sym, div, dec in (("BTC/USDT", 1, 2), ("ETH/USDT", 20, 2), ("SOL/USDT", 100, 3)):
        if sym in names:
            c = btc.copy()
            c[["open", "high", "low", "close"]] = (c[["open", "high", "low", "close"]] / div).round(dec)
            out[sym] = c
    return out


def _entries_filled_within_cash(j, usdt_by_candle):
    "Every approved entry filled; per candle the quote its fills took (a fee paid in quote included) <= free before."
    approved = [d for d in j.decisions(10_000) if d["approved"] and d["client_order_id"]]
    spent = {}
    for d in approved:
        last = j.last_order(d["client_order_id"])
        assert last is not None and last["status"] == "closed" and last["filled"] > 0, (d, last)
        q = sum(f["price"] * f["amount"] + (f["fee"] if f["fee_currency"] == "USDT" else 0.0)
                for f in j.fills(d["client_order_id"]))
        spent[d["candle_time"]] = spent.get(d["candle_time"], 0.0) + q
    for ct, q in spent.items():
        assert q <= usdt_by_candle[ct] * (1 + 1e-12), (ct, q, usdt_by_candle[ct])
    return approved


# risk 1 %: the case (2/3 of the cash for the first, the second sized on the rest, the third nothing left);
# 0.6 %: two full entries and a third sized on what is left; 0.5 %: three that want exactly all the cash (the edge:
# the fee and the slippage allowance push the third over by a hair)
@pytest.mark.parametrize("risk_pct", [1.0, 0.6, 0.5])
def test_three_same_candle_entries_commit_fee_and_slippage_allowance(tmp_path, risk_pct):
    """150 USDT, three symbols entering on the same candle, the exchange filling market buys 0.5 % above the open
    (fee 0.1 %, taken in the base): the cash each entry commits covers its fee and slippage allowance, and a filled
    entry counts at what its fills took, so the exchange refuses none and every approved entry fills."""
    from cryptobot.strategy import make_strategy
    strat = make_strategy("ema_cross", {"fast": 3, "slow": 8})
    emu, s, pr = _paper_portfolio(tmp_path, _same_path(), strat, usdt=150.0, risk_pct=risk_pct, fee_pct=0.1,
                                  slippage_pct=0.5, max_open_positions=3, max_total_risk_pct=5.0, min_balance_usd=100)
    j, free_before, triples = pr.journal, {}, []

    def each(k, usdt_before, ticks):
        for t in ticks.values():
            free_before.setdefault(t.candle_time, usdt_before)
        ct = {t.candle_time for t in ticks.values()}
        rows = [d for d in j.decisions(10) if d["candle_time"] in ct and d["plan"]]
        if len(rows) == 3:
            triples.append(rows)
    try:
        _stepped(emu, pr, 80, each)
        assert triples, "the three symbols never signalled on the same candle"
        first = sorted(triples[0], key=lambda d: d["id"] if "id" in d else 0)
        print("first same-candle entries:", [(d["symbol"], d["approved"], d["plan"]["notional"],
                                              d["plan"]["limited_by"]) for d in first])
        refused = j.select("SELECT * FROM orders WHERE status = 'rejected'")
        funds = [e for e in j.last_events(10_000) if "nsufficient" in (e.get("message") or "")]
        assert not refused and not funds, (refused[:3], funds[:3])
        approved = _entries_filled_within_cash(j, free_before)
        assert any(d["plan"]["limited_by"] == "portfolio_cash" for d in approved), "no entry was sized on the rest"
    finally:
        pr.close()
        j.close()
        emu.stop()


def test_single_runner_entry_commits_fee_and_slippage_allowance(tmp_path):
    """One symbol (the single `Runner`), 2 % risk at a 1.5 % stop: the leverage cap wants all the cash, the cash cap
    binds; the exchange fills 0.5 % above the open and the order still fits the free balance."""
    from cryptobot.emulator import Emulator
    from cryptobot.live import start_runner
    from cryptobot.strategy import make_strategy, save_strategy_artifact
    strat = make_strategy("ema_cross", {"fast": 3, "slow": 8})
    candles = _same_path(names=("BTC/USDT",))["BTC/USDT"]
    emu = Emulator(candles, timeframe="1h", balances={"USDT": 150.0}, api_key=KEY, api_secret=SECRET,
                   clock="stepped", start=START, fee_pct=0.1, slippage_pct=0.5)
    emu.start()
    s = Settings(state_dir=tmp_path / "state", exchange_url=emu.base_url, api_key=KEY, api_secret=SECRET,
                 kill_switch_losses=10, risk_pct=2.0, fee_pct=0.1, slippage_pct=0.5)
    art = save_strategy_artifact(strat, tmp_path / "art", symbol="BTC/USDT", timeframe="1h").parent
    try:
        r = start_runner(s, "paper", art, strategy=strat, settle_s=0.0, poll_s=0.02, min_poll_s=0.01,
                         executor_kw={"settle_s": 0.0, "sleep": lambda _s: None},
                         retry={"retries": 3, "base_delay": 0.05, "max_delay": 0.2}, rate_limit_ms=1.0)
    except BaseException:
        emu.stop()
        raise
    j, free_before = r.journal, {}
    try:
        for k in range(80):
            if k:
                emu.advance(1)
            before = emu.balances["USDT"]["free"]
            t = r.step()
            if t is not None:
                free_before.setdefault(t.candle_time, before)
        r.queue.drain(60)
        assert not j.select("SELECT * FROM orders WHERE status = 'rejected'"), "an entry refused by the exchange"
        approved = _entries_filled_within_cash(j, free_before)
        assert any(d["plan"]["limited_by"] == "cash" for d in approved), [d["plan"]["limited_by"] for d in approved]
    finally:
        r.close()
        j.close()
        emu.stop()


# ---------------------------------------------------------------------------------------------------- alerts
# One notifier for the portfolio (apprise's json:// webhook to a real receiver on 127.0.0.1), each alert naming its
# symbol; a dead receiver changes nothing about trading.
from test_notify import closed_port, receiver  # noqa: E402,F401 - `receiver` is a fixture

TOKEN = "pfTok3nS3CRET77"
FAST = dict(timeout_s=0.5, attempts=2, backoff_s=0.05)


def _alerting_portfolio(tmp_path, url, candles=None, arts=None, hand_order=True):
    "A stepped 3-symbol emulator (stop-limit stops), kill switch after 1 loss, alerts to `url`; SOL has an order "
    "placed by hand (the start-up reconciliation of SOL fails)."
    from cryptobot.client import make_client
    from cryptobot.emulator import Emulator
    from cryptobot.config import Secret
    from cryptobot.live import start_portfolio
    from cryptobot.strategy import make_strategy, save_strategy_artifact
    candles = candles or _market((7, 11, 13))
    strat = make_strategy("ema_cross", {"fast": 3, "slow": 8})
    emu = Emulator(candles, timeframe="1h", balances={"USDT": 10_000}, api_key=KEY, api_secret=SECRET,
                   clock="stepped", start=START, filters=OWN_FILTERS)
    emu.start()
    try:
        if hand_order:
            hand = make_client(api_key=KEY, api_secret=SECRET, base_url=emu.base_url)
            hand.load_markets()
            hand.create_order("SOL/USDT", "limit", "buy", 1.0, 50.0, {"clientOrderId": "by-hand-sol"})
        s = Settings(state_dir=tmp_path / "state", exchange_url=emu.base_url, api_key=KEY, api_secret=SECRET,
                     symbols=tuple(candles), kill_switch_losses=1, **({"notify_urls": Secret(url)} if url else {}))
        arts = arts or {sym: save_strategy_artifact(strat, tmp_path / "art" / sym.replace("/", ""), symbol=sym,
                                                    timeframe="1h").parent for sym in candles}
        emu.faults.add("stop_unfilled")            # the first stop that triggers does not fill: an emergency exit
        pr = start_portfolio(s, "paper", arts, strategy=strat, settle_s=0.0, poll_s=0.02, min_poll_s=0.01,
                             executor_kw={"settle_s": 0.0, "sleep": lambda _s: None},
                             retry={"retries": 1, "base_delay": 0.01, "max_delay": 0.02}, rate_limit_ms=1.0,
                             notify_kw=FAST)
    except BaseException:
        emu.stop()
        raise
    return emu, s, pr


def _crash_next_bar(emu, stop_cid):
    "Reshape the bar after the one `stop_cid` was placed in: a down bar through the stop (as `runner_rig` does)."
    (st,) = [o for o in emu.orders if o["client_order_id"] == stop_cid]
    tape = emu.tapes[st["symbol"].replace("/", "")]
    with emu._lock:
        i = tape.bar_at(st["time"]) + 1
        o, low = float(tape.c[i - 1]), st["stop_price"] * 0.97
        tape.set_bar(i, o, o * 1.001, low, low * 1.003, 12.0)
    return st


def _scenario(emu, s, pr):
    "Trade to the first loss (kill switches lock), unlock the symbol then the portfolio, 2 h without klines, back."
    from cryptobot.guardian import unlock_cli
    crashed = None
    for k in range(200):
        if k:
            emu.advance(1)
        pr.step()
        if pr.guardian.locked:
            break
        held = [r for r in pr.runners if r.executor.position() is not None]
        if crashed is None and held:                 # the bar after the stop's falls through it: the stop triggers
            crashed = _crash_next_bar(emu, held[0].executor.position().stop_cid)
    assert pr.guardian.locked, "no losing trade in 200 candles"
    (sym,) = pr._locks()                        # the losing trade's symbol is locked too (1 loss)
    emu.advance(1)
    pr.step()
    assert unlock_cli(s, "reviewed the symbol's loss", symbol=sym).startswith(f"{sym} unlocked")
    emu.advance(1)
    pr.step()
    assert unlock_cli(s, "reviewed the portfolio").startswith("unlocked")
    emu.advance(1)
    pr.step()
    emu.faults.add("server_error", count=10**6, endpoint="klines")
    for _ in range(2):
        emu.advance(1)
        pr.step()
    emu.faults.clear()
    for _ in range(30):                         # data back, and past the next UTC midnight (the daily summary)
        emu.advance(1)
        pr.step()
    pr.queue.drain(60)
    return sym


def _titles(receiver, *words):
    return [b for p, b in receiver.got if p.startswith("/ok/") and all(w in b["title"] for w in words)]


def test_portfolio_alerts_reach_the_receiver_each_naming_its_symbol(receiver, tmp_path):
    emu, s, pr = _alerting_portfolio(tmp_path, receiver.url(f"/ok/{TOKEN}"))
    j = pr.journal
    try:
        sym = _scenario(emu, s, pr)
        assert pr.notifier.flush(30)
        events = j.select("SELECT kind, message, data FROM events ORDER BY id")
        trades = j.trades()
        exits = j.select("SELECT symbol, amount FROM intents WHERE purpose = 'emergency_exit'")
    finally:
        pr.close()
        j.close()
        emu.stop()
    t = lambda *w: [b["title"].removeprefix("cryptobot: ") for b in _titles(receiver, *w)]
    # the start-up reconciliation of SOL: named, once (not once per candle while it stays unreconciled)
    assert t("MISMATCH") == ["Reconciliation MISMATCH SOL/USDT"]
    assert "1 unknown open orders (by-hand-sol)" in _titles(receiver, "MISMATCH")[0]["message"]
    # the losing trade locked its symbol's kill switch and the portfolio's: one alert each, each unlock once
    locks = [json.loads(e["data"])["symbol"] for e in events if e["kind"] == "symbol_lock"]
    assert locks[0] == sym and t("LOCKED")[:2] == ["Kill switch LOCKED (portfolio)", f"Kill switch LOCKED ({sym})"]
    assert [x for x in t("LOCKED") if "portfolio" not in x] == [f"Kill switch LOCKED ({x})" for x in locks]
    assert f"kill switch for {sym}: 1 consecutive losing trades on {sym}" in _titles(receiver, "LOCKED", sym)[0]["message"]
    assert f"cryptobot unlock --symbol {sym}" in _titles(receiver, "LOCKED", sym)[0]["message"]
    assert t("unlocked") == [f"Kill switch unlocked ({sym})", "Kill switch unlocked (portfolio)"]
    assert "reviewed the symbol's loss" in _titles(receiver, "unlocked", sym)[0]["message"]
    assert "reviewed the portfolio" in _titles(receiver, "unlocked", "portfolio")[0]["message"]
    # the first stop that triggered did not fill: the emergency exit, named by its symbol
    assert exits, "no stop triggered"
    assert t("EMERGENCY") == [f"EMERGENCY EXIT {x['symbol']}" for x in exits]
    assert _titles(receiver, "EMERGENCY")[0]["message"].startswith(f"Closed {exits[0]['amount']} {exits[0]['symbol']}")
    # no klines for 2 h: each symbol's stale data once, then its recovery once
    assert sorted(t("Stale data")) == [f"Stale data {x}" for x in SYMS]
    assert sorted(t("Data back")) == [f"Data back {x}" for x in SYMS]
    stale = [json.loads(e["data"]) for e in events if e["kind"] == "data_stale"]
    assert sorted(d["symbol"] for d in stale) == list(SYMS)
    # the daily summary covers the portfolio: per-symbol PnL, trades, open positions and locks, as journaled
    summaries = [json.loads(e["data"]) for e in events if e["kind"] == "daily_summary"]
    assert summaries and len(_titles(receiver, "Daily summary")) == len(summaries)
    assert sum(d["trades"] for d in summaries) == len(trades) >= 1
    for d, body in zip(summaries, _titles(receiver, "Daily summary")):
        day = [x for x in trades if d["day_start"] <= x["exit_time"] < d["day_start"] + 86400]
        assert d["trades"] == len(day) and d["pnl"] == pytest.approx(sum(x["pnl"] for x in day))
        assert set(d["symbols"]) == set(SYMS) and body["title"] == f"cryptobot: Daily summary {d['day']}"
        for x in SYMS:
            mine, v = [y for y in day if y["symbol"] == x], d["symbols"][x]
            assert v["trades"] == len(mine) and v["pnl"] == pytest.approx(sum(y["pnl"] for y in mine))
            line = f"{x}: PnL {v['pnl']:+.2f} over {len(mine)} trade(s), " + (f"open {v['open']:g}" if v["open"] else "flat")
            assert line + (f", LOCKED ({v['lock']})." if v["lock"] else ".") in body["message"].splitlines()
    assert TOKEN not in json.dumps(events) and not [e for e in events if e["kind"] in ("notify_failed", "alert_error")]


def test_dead_or_hanging_receiver_trades_the_portfolio_exactly_the_same(receiver, tmp_path):
    "The same 3-symbol scenario with a good, a hanging and a refusing receiver: the same orders, trades, decisions, "
    "locks and journaled daily summaries; each alert that did not arrive journaled (notify_failed / notify_unsent)."
    runs = {}
    for name, url in (("ok", receiver.url(f"/ok/{TOKEN}")), ("hang", receiver.url(f"/hang/{TOKEN}")),
                      ("refused", f"json://127.0.0.1:{closed_port()}/{TOKEN}")):
        emu, s, pr = _alerting_portfolio(tmp_path / name, url)
        j = pr.journal
        try:
            sym = _scenario(emu, s, pr)
        finally:
            pr.close()                              # bounded: a hanging receiver holds the shutdown 5 s at most
        try:
            q = lambda sql: [dict(r) for r in j.select(sql)]
            runs[name] = dict(
                sym=sym, locks=sorted(pr._locks()), portfolio_locked=pr.guardian.locked,
                intents=q("SELECT client_order_id, symbol, side, type, amount, price, stop_price, purpose, candle_time "
                          "FROM intents ORDER BY id"),
                trades=q("SELECT trade_key, symbol, entry_price, exit_price, amount, pnl, exit_reason FROM trades ORDER BY id"),
                decisions=q("SELECT symbol, candle_time, approved, reasons, plan FROM decisions ORDER BY id"),
                summaries=[json.loads(r["data"]) for r in q("SELECT data FROM events WHERE kind = 'daily_summary'")],
                failed=[json.loads(r["data"]) for r in q("SELECT data FROM events WHERE kind IN ('notify_failed', "
                                                         "'notify_unsent') ORDER BY id")],
                text=json.dumps(q("SELECT * FROM events")))
        finally:
            j.close()
            emu.stop()
    ok = runs["ok"]
    assert ok["intents"] and ok["trades"] and ok["summaries"] and not ok["failed"]
    assert {i["purpose"] for i in ok["intents"]} >= {"entry", "stop", "emergency_exit"}
    for name in ("hang", "refused"):
        r = runs[name]
        for k in ("sym", "locks", "portfolio_locked", "intents", "trades", "decisions", "summaries"):
            assert r[k] == ok[k], (name, k)
        assert r["failed"], name
        kinds = {f.get("alert") for f in r["failed"] if "alert" in f}
        assert "kill_locked" in kinds or any("unsent" in f for f in r["failed"]), (name, r["failed"])
        assert all(f.get("target", "json://127.0.0.1:****") == "json://127.0.0.1:****" for f in r["failed"])
        assert TOKEN not in r["text"]
    assert {f["alert"] for f in runs["refused"]["failed"] if "alert" in f} >= \
        {"reconcile_mismatch", "kill_locked", "kill_unlocked", "emergency_exit", "stale_data", "daily_summary"}


def test_start_refusal_names_the_refused_symbol(receiver, tmp_path):
    "ETH's artifact was backtested on another market: the portfolio does not start, and a person hears which symbol."
    from cryptobot.live import StartupRefused
    from cryptobot.strategy import make_strategy, save_strategy_artifact
    strat = make_strategy("ema_cross", {"fast": 3, "slow": 8})
    arts = {sym: save_strategy_artifact(strat, tmp_path / "art" / sym.replace("/", ""), timeframe="1h",
                                        symbol="BTC/USDT" if sym == "ETH/USDT" else sym).parent for sym in SYMS}
    with pytest.raises(StartupRefused, match="ETH/USDT: strategy .* was backtested on BTC/USDT 1h"):
        _alerting_portfolio(tmp_path, receiver.url(f"/ok/{TOKEN}"), arts=arts, hand_order=False)
    (body,) = [b for _, b in receiver.got]          # close(5) ran before the refusal was raised: delivered
    assert body["title"] == "cryptobot: Strategy refused: backtested on another market (ETH/USDT)" and body["type"] == "failure"
    assert body["message"].startswith("ETH/USDT: strategy ") and "nothing was traded" in body["message"]


# ---------------------------------------------------------------------------------------------------- status, dashboard
def portfolio_state_dir(tmp_path) -> tuple[Settings, dict]:
    "A 3-symbol stepped paper run (no alerts): the first loss locks its symbol and the portfolio; the portfolio is "
    "unlocked (the symbol stays locked) and the run goes on until a position is open. What the runner saw, per symbol."
    from cryptobot.guardian import unlock_cli
    emu, s, pr = _alerting_portfolio(tmp_path, None, hand_order=False)
    j, seen = pr.journal, {}
    try:
        for k in range(200):
            if k:
                emu.advance(1)
            pr.step()
            if pr.guardian.locked:
                break
        (locked,) = pr._locks()
        unlock_cli(s, "reviewed the portfolio")
        for k in range(200):
            emu.advance(1)
            pr.step()
            if any(r.executor.position() is not None for r in pr.runners):
                break
        pr.queue.drain(60)
        for r in pr.runners:
            pos = r.executor.position()
            sig = r.journal.last_events(1, kind="signal")
            seen[r.symbol] = {"amount": emu.order(client_order_id=pos.entry_cid)["executed_qty"] if pos else None,
                              "entry": pos.entry_price if pos else None,
                              "stop": emu.order(client_order_id=pos.stop_cid)["stop_price"] if pos else None,
                              "signal": sig[0]["data"]["action"] if sig else None}
        assert not pr._locks() and locked, "the portfolio unlock lifts the symbol's lock too"
        eq = j.select("SELECT equity FROM marks WHERE equity IS NOT NULL ORDER BY id DESC LIMIT 1")[0]["equity"]
        # the open risk at the stops actually placed (1.5 % below each entry's fill, not the close's plan)
        seen["_risk_pct"] = sum(seen[x]["amount"] * (seen[x]["entry"] - float(seen[x]["stop"]))
                                for x in SYMS if seen[x]["amount"]) / eq * 100
    finally:
        pr.close()
        j.close()
        emu.stop()
    assert any(v["amount"] for k, v in seen.items() if k in SYMS)
    return s, seen


def _status_cli(s, *args):
    import os
    import subprocess
    import sys
    from pathlib import Path
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CRYPTOBOT_", "BINANCE_")) and k != "GO_LIVE"}
    env.update(CRYPTOBOT_STATE_DIR=str(s.state_dir), CRYPTOBOT_SYMBOLS=",".join(s.symbols),
               CRYPTOBOT_KILL_SWITCH_LOSSES=str(s.kill_switch_losses))
    return subprocess.run([str(Path(sys.executable).parent / "cryptobot"), "status", *args], cwd=s.state_dir, env=env,
                          capture_output=True, text=True, timeout=120)


def test_status_shows_each_symbol_and_the_portfolio(tmp_path):
    from cryptobot.monitor import position_html, snapshot, status_html
    s, seen = portfolio_state_dir(tmp_path)
    r = _status_cli(s, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    pf, rows = d["portfolio"], {x["symbol"]: x for x in d["per_symbol"]}
    n_open = sum(1 for x in SYMS if seen[x]["amount"])
    assert (pf["open_positions"], pf["max_open_positions"], pf["max_total_risk_pct"]) == (n_open, 3, 3.0)
    assert pf["open_risk_pct"] == pytest.approx(seen["_risk_pct"]) and d["locked"] is False
    for x in SYMS:
        assert (rows[x]["position"] == pytest.approx(seen[x]["amount"])) if seen[x]["amount"] else rows[x]["position"] is None
        assert (rows[x]["stop_price"] == pytest.approx(float(seen[x]["stop"]))) if seen[x]["amount"] else True
        assert rows[x]["stop_status"] == ("open" if seen[x]["amount"] else None)
        assert rows[x]["last_signal"]["action"] == seen[x]["signal"] and rows[x]["locked"] is False
        assert rows[x]["last_decision"] is None or rows[x]["last_decision"]["symbol"] == x
    r = _status_cli(s)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    (pline,) = [l for l in lines if l.startswith("portfolio  ")]
    assert pline.startswith(f"portfolio  {n_open}/3 positions open · open risk ") and pline.endswith("kill switch unlocked")
    assert f"{seen['_risk_pct']:.2f} % of equity" in pline and "limit 3 %" in pline
    for x in SYMS:
        (l,) = [l for l in lines if l.startswith(f"{x:<10} ")]
        assert l.endswith(" · unlocked"), l
        assert (f"{seen[x]['amount']:g} @ " in l and "(open)" in l) if seen[x]["amount"] else " flat · " in l
        assert f"signal {seen[x]['signal']} at " in l
    # the dashboard's panels: the portfolio and a row per symbol
    snap = snapshot(s)
    html = position_html(snap)
    assert "<h2>Portfolio</h2>" in html and f'id="cbm-pf-positions">{n_open} / 3<' in html
    for x in SYMS:
        assert f'id="cbm-sym-{x.replace("/", "")}"' in html
    assert ", ".join(SYMS) in status_html(snap)
    # one symbol configured on the same state dir: the panels as before (no portfolio section, one symbol's header)
    one = dataclasses.replace(s, symbols=(s.symbol,))
    snap1 = snapshot(one)
    assert "portfolio" not in snap1["status"] and "Portfolio" not in position_html(snap1)
    assert f"cryptobot monitor — {s.symbol} 1h<" in status_html(snap1)


def test_status_shows_a_symbol_lock_while_the_portfolio_trades(book, tmp_path):
    make, clock = book
    s, j, g = make()
    for i, (sym, pnl) in enumerate([("ETH/USDT", -1.0), ("BTC/USDT", 3.0), ("ETH/USDT", -2.0), ("SOL/USDT", 1.0),
                                    ("ETH/USDT", -1.0)]):
        assert g.record_trade(_trade(f"t{i}", sym, pnl))
    j.close()
    r = _status_cli(s)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    (pline,) = [l for l in lines if l.startswith("portfolio  ")]
    assert pline.startswith("portfolio  0/3 positions open · open risk 0.00 (equity unknown; limit 3 %)")
    assert pline.endswith("kill switch unlocked")
    rows = {x: [l for l in lines if l.startswith(f"{x:<10} ")][0] for x in SYMS}
    assert rows["ETH/USDT"].endswith("LOCKED (3 losses)") and rows["BTC/USDT"].endswith("unlocked")
    assert " flat · no signal yet · no decision yet · " in rows["SOL/USDT"]
    from cryptobot.monitor import position_html, snapshot
    html = position_html(snapshot(s))
    assert 'id="cbm-pf-lock">unlocked<' in html and '<td class="neg">LOCKED (3 losses)</td>' in html


# ---------------------------------------------------------------------------------------------------- parity
def test_parity_and_the_audit_check_each_symbols_feature_rows(tmp_path):
    "Each symbol's journaled feature rows (`live` for the first, `live:SYMBOL` for the others) against its own stored "
    "candles: all agree after a 3-symbol run; one altered ETH row fails ETH's parity and the audit check, naming ETH."
    from cryptobot.audit import FAIL, PASS, Evidence, check_feature_parity
    from cryptobot.data import raw_path, save_candles
    from cryptobot.parity import feature_source, parity
    from cryptobot.strategy import make_strategy
    candles = _market((7, 11, 13))
    emu, s, pr = _paper_portfolio(tmp_path, candles, make_strategy("ema_cross", {"fast": 3, "slow": 8}))
    try:
        _stepped(emu, pr, 40)
    finally:
        pr.close()
        pr.journal.close()
        emu.stop()
    s = dataclasses.replace(s, data_dir=tmp_path / "data")
    for sym, df in candles.items():
        save_candles(df, raw_path(s.data_dir, sym, "1h"))
    assert [feature_source(s, x) for x in SYMS] == ["live", "live:ETH/USDT", "live:SOL/USDT"]
    for sym in SYMS:
        rep = parity(s, symbol=sym)
        assert rep.compared >= 30 and rep.ok, (sym, str(rep))
    assert parity(s).rows == parity(s, symbol="BTC/USDT").rows                 # the first symbol: as before
    ev = Evidence(s, ask_exchange=False, backtest=False)
    try:
        c = check_feature_parity(ev)
    finally:
        ev.close()
    assert c.status == PASS and all(f"{x}: parity OK: " in c.evidence for x in SYMS), c
    import sqlite3
    con = sqlite3.connect(s.state_dir / JOURNAL_FILE)            # one ETH row altered after the fact
    with con:
        rid, feats = con.execute("SELECT id, features FROM feature_rows WHERE source = 'live:ETH/USDT' "
                                 "ORDER BY id DESC LIMIT 1").fetchone()
        f = json.loads(feats)
        k = next(iter(f))
        f[k] = (f[k] or 0.0) + 1.0
        con.execute("UPDATE feature_rows SET features = ? WHERE id = ?", (json.dumps(f), rid))
    con.close()
    assert parity(s, symbol="ETH/USDT").mismatched == 1 and parity(s).ok and parity(s, symbol="SOL/USDT").ok
    ev = Evidence(s, ask_exchange=False, backtest=False)
    try:
        c = check_feature_parity(ev)
    finally:
        ev.close()
    assert c.status == FAIL and "ETH/USDT: the runner computed other features" in c.detail, c
    assert "BTC/USDT" not in c.detail and "SOL/USDT" not in c.detail
