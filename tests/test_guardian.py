"Guardian: every check both ways, forged/reused/expired approvals, fail-closed state loading, journal agreement, CLI helpers."
import copy
import dataclasses
import json
import math
import os
import pickle
from datetime import datetime
from types import SimpleNamespace

import pytest

from cryptobot import guardian as G
from cryptobot.config import Settings
from cryptobot.guardian import (Approval, ApprovalError, Context, Denial, Guardian, GuardianError, Reason, Signal,
                                client_order_id, format_status, read_state, status_report, unlock_cli)
from cryptobot.journal import ClosedTrade, Journal, JournalError
from cryptobot.risk import Market, Plan, RiskEngine

T = 1_704_070_800.0  # 2024-01-01 01:00 UTC, a candle close
FP = "f" * 64


class Clock:
    def __init__(self, t):
        self.t = t

    def __call__(self):
        return self.t


@pytest.fixture
def env(tmp_path):
    return make_env(tmp_path)


def make_env(tmp_path, **settings_kw):
    s = Settings(state_dir=tmp_path, **settings_kw)
    clock = Clock(T + 10)
    j = Journal(tmp_path / "journal.sqlite", clock=clock)
    g = Guardian(s, tmp_path, j, clock=clock)
    plan = RiskEngine.from_settings(s).plan(42_000.0, 10_000.0, 10_000.0)
    sig = Signal("BTC/USDT", "buy", T, FP)
    ctx = Context(now=T + 10, last_candle_close=T, feature_fingerprint=FP, mode=s.mode, free_quote=10_000.0,
                  equity=10_000.0, reconciled=True, market=Market())
    return SimpleNamespace(s=s, clock=clock, j=j, g=g, plan=plan, sig=sig, ctx=ctx, dir=tmp_path)


def trade(key, pnl, exit_time=T + 3600, equity_after=None):
    return ClosedTrade(trade_key=key, symbol="BTC/USDT", entry_time=exit_time - 3600, exit_time=exit_time,
                       entry_price=100.0, exit_price=100.0 + pnl, amount=1.0, fees=0.2, pnl=pnl,
                       exit_reason="stop" if pnl < 0 else "model", equity_after=equity_after)


# ----------------------------------------------------------------------------------------------- every check both ways
R = dataclasses.replace


def _lock(e, n):
    for i in range(n):
        e.g.record_trade(trade(f"L{i}", -1.0))


def _journal_position(e, final):
    e.j.record_intent("cbe-old", "BTC/USDT", "buy", "market", 0.01, purpose="entry")
    e.j.record_order_status("cbe-old", "closed", filled=0.01, average=41_000.0)
    if final:
        e.j.record_trade(trade("cbe-old", 1.0))


def _duplicate(e, first):
    "Send an entry for this candle, then close it (no position, no open intents left): only the duplicate remains."
    if first:
        return
    a = e.g.approve(e.sig, e.plan, e.ctx)
    e.g.redeem(a)
    e.j.record_order_status(a.client_order_id, "closed", filled=a.amount, average=a.price)
    e.g.record_trade(trade(a.client_order_id, 1.0))


def _wide_stop_plan(e):
    return RiskEngine(stop_loss_pct=2.0).plan(42_000.0, 10_000.0, 10_000.0)   # inside the ceiling, not the setting


def _off_step_plan(e):
    p = e.plan
    amt = p.amount + 1e-7
    return R(p, amount=amt, notional=amt * p.entry_price, risk_amount=amt * (p.entry_price - p.stop_price))


def _bigger_equity_plan(e):
    return RiskEngine.from_settings(e.s).plan(42_000.0, 20_000.0, 20_000.0)


CASES = {
    # name: (setup(e) -> (sig, plan, ctx) for the FAILING variant, same for the PASSING variant, expected reasons)
    "kill_switch": (lambda e: (_lock(e, 3), (e.sig, e.plan, e.ctx))[1],
                    lambda e: (_lock(e, 2), (e.sig, e.plan, e.ctx))[1], {Reason.KILL_SWITCH}),
    "stale_data_boundary": (lambda e: (e.sig, e.plan, R(e.ctx, now=T + 301)) if not setattr(e.clock, "t", T + 301) else None,
                            lambda e: (e.sig, e.plan, R(e.ctx, now=T + 300)) if not setattr(e.clock, "t", T + 300) else None,
                            {Reason.STALE_DATA}),
    "stale_data_guardian_clock": (lambda e: (e.sig, e.plan, e.ctx) if not setattr(e.clock, "t", T + 900) else None,
                                  lambda e: (e.sig, e.plan, e.ctx), {Reason.STALE_DATA}),
    "candle_in_future": (lambda e: (R(e.sig, candle_time=T + 3600), e.plan, R(e.ctx, last_candle_close=T + 3600)),
                         lambda e: (R(e.sig, candle_time=T + 14), e.plan, R(e.ctx, last_candle_close=T + 14)),
                         {Reason.STALE_DATA}),
    "stale_signal": (lambda e: (R(e.sig, candle_time=T - 3600), e.plan, e.ctx),
                     lambda e: (R(e.sig, candle_time=datetime.fromtimestamp(T).astimezone()), e.plan, e.ctx),
                     {Reason.STALE_SIGNAL}),
    "mode_mismatch": (lambda e: (e.sig, e.plan, R(e.ctx, mode="live")), lambda e: (e.sig, e.plan, e.ctx),
                      {Reason.MODE_MISMATCH}),
    "position_open": (lambda e: (e.sig, e.plan, R(e.ctx, positions={"BTC/USDT": 1e-5})),
                      lambda e: (e.sig, e.plan, R(e.ctx, positions={"BTC/USDT": 9e-6, "ETH/USDT": 3.0})),
                      {Reason.POSITION_OPEN}),
    "position_in_journal": (lambda e: (_journal_position(e, final=False), (e.sig, e.plan, e.ctx))[1],
                            lambda e: (_journal_position(e, final=True), (e.sig, e.plan, e.ctx))[1],
                            {Reason.POSITION_OPEN}),
    "plan_wider_stop": (lambda e: (e.sig, _wide_stop_plan(e), e.ctx), lambda e: (e.sig, e.plan, e.ctx),
                        {Reason.PLAN_OUT_OF_BOUNDS}),
    "plan_precision": (lambda e: (e.sig, _off_step_plan(e), e.ctx), lambda e: (e.sig, e.plan, e.ctx),
                       {Reason.PLAN_OUT_OF_BOUNDS}),
    "plan_sized_on_more_equity": (lambda e: (e.sig, _bigger_equity_plan(e), e.ctx),
                                  lambda e: (e.sig, _bigger_equity_plan(e), R(e.ctx, equity=20_000.0, free_quote=20_000.0)),
                                  {Reason.PLAN_OUT_OF_BOUNDS}),
    "plan_more_risk_engine": (lambda e: (e.sig, RiskEngine(risk_pct=2.0).plan(42_000.0, 10_000.0, 10_000.0), e.ctx),
                              lambda e: (e.sig, RiskEngine(risk_pct=0.5).plan(42_000.0, 10_000.0, 10_000.0), e.ctx),
                              {Reason.PLAN_OUT_OF_BOUNDS}),
    "plan_cash": (lambda e: (e.sig, e.plan, R(e.ctx, free_quote=e.plan.notional)),
                  lambda e: (e.sig, e.plan, R(e.ctx, free_quote=e.plan.notional * e.g.cash_factor + 0.01)),  # fee, slippage
                  {Reason.PLAN_OUT_OF_BOUNDS}),
    "plan_not_a_plan": (lambda e: (e.sig, RiskEngine().plan(42_000.0, 1.0, 1.0), e.ctx),
                        lambda e: (e.sig, e.plan, e.ctx), {Reason.PLAN_OUT_OF_BOUNDS}),
    "fingerprint": (lambda e: (R(e.sig, model_fingerprint="e" * 64), e.plan, e.ctx), lambda e: (e.sig, e.plan, e.ctx),
                    {Reason.FINGERPRINT_MISMATCH}),
    "fingerprint_empty": (lambda e: (R(e.sig, model_fingerprint=""), e.plan, R(e.ctx, feature_fingerprint="")),
                          lambda e: (e.sig, e.plan, e.ctx), {Reason.FINGERPRINT_MISMATCH}),
    "unknown_orders": (lambda e: (e.sig, e.plan, R(e.ctx, unknown_orders=1)), lambda e: (e.sig, e.plan, e.ctx),
                       {Reason.UNRECONCILED_ORDERS}),
    "journal_open_intent": (
        lambda e: (e.j.record_intent("cbs-x", "BTC/USDT", "sell", "limit", 0.01, purpose="stop"), (e.sig, e.plan, e.ctx))[1],
        lambda e: (e.j.record_intent("cbs-x", "BTC/USDT", "sell", "limit", 0.01, purpose="stop"),
                   e.j.record_order_status("cbs-x", "canceled"), (e.sig, e.plan, e.ctx))[2],
        {Reason.UNRECONCILED_ORDERS}),
    "not_reconciled": (lambda e: (e.sig, e.plan, R(e.ctx, reconciled=False)), lambda e: (e.sig, e.plan, e.ctx),
                       {Reason.NOT_RECONCILED}),
    "side": (lambda e: (R(e.sig, side="sell"), e.plan, e.ctx), lambda e: (e.sig, e.plan, e.ctx), {Reason.SIDE_NOT_BUY}),
    "symbol": (lambda e: (R(e.sig, symbol="ETH/USDT"), e.plan, e.ctx), lambda e: (e.sig, e.plan, e.ctx),
               {Reason.SYMBOL_MISMATCH}),
    "duplicate": (lambda e: (_duplicate(e, False), (e.sig, e.plan, e.ctx))[1],
                  lambda e: (_duplicate(e, True), (e.sig, e.plan, e.ctx))[1], {Reason.DUPLICATE_ORDER}),
    "invalid_equity": (lambda e: (e.sig, e.plan, R(e.ctx, equity=float("nan"))), lambda e: (e.sig, e.plan, e.ctx),
                       {Reason.INVALID_INPUT}),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("way", ["fails", "passes"])
def test_each_check_both_ways(tmp_path, name, way):
    e = make_env(tmp_path)
    bad, good, expected = CASES[name]
    sig, plan, ctx = (bad if way == "fails" else good)(e)
    res = e.g.approve(sig, plan, ctx)
    last = e.j.decisions(1)[0]
    if way == "passes":
        assert isinstance(res, Approval), str(res)
        assert last["approved"] and last["decision_id"] == res.approval_id
    else:
        assert isinstance(res, Denial) and not res
        assert set(res.reasons) == expected, str(res)
        assert not last["approved"] and len(last["reasons"]) == len(res.failures)
        assert all(r.split(" ")[0] in {x.value for x in expected} for r in last["reasons"])
        assert "\n" not in str(res)


@pytest.mark.parametrize("free,ok", [(100.0, True), (99.99, False)])
def test_balance_floor_live_both_ways(tmp_path, free, ok):
    e = make_env(tmp_path, go_live=True)
    plan = RiskEngine.from_settings(e.s).plan(42_000.0, free, free)
    assert isinstance(plan, Plan)
    res = e.g.approve(e.sig, plan, R(e.ctx, mode="live", free_quote=free, equity=free))
    assert bool(res) is ok, str(res)
    if not ok:
        assert set(res.reasons) == {Reason.BALANCE_FLOOR}


def test_live_needs_market(tmp_path):
    e = make_env(tmp_path, go_live=True)
    res = e.g.approve(e.sig, e.plan, R(e.ctx, mode="live", market=None))
    assert set(res.reasons) == {Reason.INVALID_INPUT} and "market" in str(res)


def test_malformed_inputs_deny_never_crash(env):
    res = env.g.approve(SimpleNamespace(), None, SimpleNamespace())
    assert isinstance(res, Denial) and Reason.INVALID_INPUT in res.reasons and len(res.failures) >= 5
    res = env.g.approve(R(env.sig, candle_time=datetime(2024, 1, 1, 1)), env.plan, env.ctx)   # naive datetime
    assert Reason.INVALID_INPUT in res.reasons
    assert [d["approved"] for d in env.j.decisions(10)] == [False, False]


def test_every_decision_journaled_with_all_reasons(env):
    env.clock.t = T + 1000
    res = env.g.approve(R(env.sig, side="sell", model_fingerprint="x"), env.plan,
                        R(env.ctx, reconciled=False, unknown_orders=2))
    assert set(res.reasons) == {Reason.STALE_DATA, Reason.SIDE_NOT_BUY, Reason.FINGERPRINT_MISMATCH,
                                Reason.UNRECONCILED_ORDERS, Reason.NOT_RECONCILED}
    d = env.j.decisions(1)[0]
    assert d["plan"]["amount"] == env.plan.amount and d["candle_time"] == T and d["mode"] == "paper"
    assert len(d["reasons"]) == 5


# ----------------------------------------------------------------------------------------------- approvals
def test_client_order_id_deterministic_and_valid():
    import re
    a = client_order_id("cryptobot", "BTC/USDT", T, "buy", "entry")
    assert a == client_order_id("cryptobot", "btc/usdt", datetime.fromtimestamp(T).astimezone(), "buy", "entry")
    assert a == client_order_id("cryptobot", "BTC/USDT", "2024-01-01T01:00:00Z", "buy", "entry")
    others = {client_order_id(*args) for args in [("cryptobot", "BTC/USDT", T + 3600, "buy", "entry"),
                                                   ("cryptobot", "BTC/USDT", T, "sell", "exit"),
                                                   ("cryptobot", "BTC/USDT", T, "sell", "stop"),
                                                   ("other", "BTC/USDT", T, "buy", "entry"),
                                                   ("cryptobot", "ETH/USDT", T, "buy", "entry")]}
    assert a not in others and len(others) == 5
    for cid in others | {a}:
        assert re.fullmatch(r"[a-zA-Z0-9-_]{1,36}", cid)
    with pytest.raises(GuardianError):
        client_order_id("cryptobot", "BTC/USDT", T, "buy", "yolo")


def test_approval_bound_and_redeemed_once(env):
    a = env.g.approve(env.sig, env.plan, env.ctx)
    assert (a.symbol, a.side, a.amount, a.price, a.stop_price) == ("BTC/USDT", "buy", env.plan.amount,
                                                                    env.plan.entry_price, env.plan.stop_price)
    assert a.expires_at == min(T + 10 + 60, T + env.s.max_data_age_s)
    assert env.g.redeem(a) is env.plan
    intent = env.j.open_intents()[0]
    assert intent["client_order_id"] == a.client_order_id and intent["approval_id"] == a.approval_id
    assert intent["amount"] == a.amount and intent["purpose"] == "entry"
    with pytest.raises(ApprovalError, match="already redeemed"):
        env.g.redeem(a)


def _tamper(a, **changes):
    "Build an Approval around the constructor (as an attacker with full module access could)."
    fake = object.__new__(Approval)
    for f in dataclasses.fields(Approval):
        object.__setattr__(fake, f.name, changes.get(f.name, getattr(a, f.name)))
    return fake


def test_forgeries_refused(env):
    a = env.g.approve(env.sig, env.plan, env.ctx)
    fields = {f.name: getattr(a, f.name) for f in dataclasses.fields(a)}
    with pytest.raises(ApprovalError, match="issued only by Guardian.approve"):
        Approval(**fields)
    with pytest.raises(ApprovalError):
        dataclasses.replace(a, amount=a.amount * 10)
    for f in (copy.copy, copy.deepcopy, pickle.dumps):
        with pytest.raises(ApprovalError):
            f(a)
    with pytest.raises(ApprovalError, match="needs an Approval"):
        env.g.redeem(SimpleNamespace(**fields))
    bigger = R(env.plan, amount=env.plan.amount * 2)
    for changes in ({"amount": a.amount * 2}, {"price": a.price * 0.9}, {"stop_price": a.stop_price * 0.5},
                    {"expires_at": a.expires_at + 3600}, {"client_order_id": "cbe-0000"}, {"plan": bigger},
                    {"signature": "0" * 64}, {"approval_id": "a-other"}):
        with pytest.raises(ApprovalError, match="invalid signature"):
            env.g.redeem(_tamper(a, **changes))
    # even with the module-private mint token the signature cannot be produced without the key
    with pytest.raises(ApprovalError, match="invalid signature"):
        env.g.redeem(Approval(_mint=G._MINT, **{**fields, "amount": a.amount * 2}))
    # the genuine one still works afterwards: forgeries did not consume it
    assert env.g.redeem(a) == env.plan


def test_approval_from_another_guardian_refused(env):
    g2 = Guardian(env.s, env.dir, env.j, clock=env.clock)
    a = env.g.approve(env.sig, env.plan, env.ctx)
    with pytest.raises(ApprovalError, match="not issued by this Guardian"):
        g2.redeem(a)
    with pytest.raises(ApprovalError, match="invalid signature"):
        g2.redeem(_tamper(a, guardian_id=g2.id))


def test_reuse_refused_across_restart(env):
    a1 = env.g.approve(env.sig, env.plan, env.ctx)
    # a "restarted" Guardian (new instance, new Journal connection) on the same state dir issues its own approval
    j2 = Journal(env.dir / "journal.sqlite", clock=env.clock)
    g2 = Guardian(env.s, env.dir, j2, clock=env.clock)
    a2 = g2.approve(env.sig, env.plan, env.ctx)
    assert a2 and a2.client_order_id == a1.client_order_id and a2.approval_id != a1.approval_id
    env.g.redeem(a1)
    with pytest.raises(ApprovalError, match="already redeemed .*journal"):
        g2.redeem(a2)
    # and a third instance refuses to even approve the same decision again
    g3 = Guardian(env.s, env.dir, Journal(env.dir / "journal.sqlite", clock=env.clock), clock=env.clock)
    assert set(g3.approve(env.sig, env.plan, env.ctx).reasons) >= {Reason.DUPLICATE_ORDER}


def test_expired_refused(env):
    a = env.g.approve(env.sig, env.plan, env.ctx)
    env.clock.t = a.expires_at + 0.001
    with pytest.raises(ApprovalError, match="expired"):
        env.g.redeem(a)
    assert env.j.open_intents() == []          # nothing journaled as sent


def test_expiry_follows_data_staleness(env):
    env.clock.t = T + 290
    a = env.g.approve(env.sig, env.plan, R(env.ctx, now=T + 290))
    assert a.expires_at == T + 300
    env.clock.t = T + 301
    with pytest.raises(ApprovalError, match="expired"):
        env.g.redeem(a)


def test_lock_after_approval_blocks_redeem(env):
    a = env.g.approve(env.sig, env.plan, env.ctx)
    _lock(env, 3)
    with pytest.raises(ApprovalError, match="kill switch is locked"):
        env.g.redeem(a)


# ----------------------------------------------------------------------------------------------- kill switch, PnL
def test_loss_streak_rules(env):
    g = env.g
    for k, pnl, streak in [("a", -1.0, 1), ("b", 2.0, 0), ("c", 0.0, 1), ("d", -0.01, 2)]:
        assert g.record_trade(trade(k, pnl))
        assert g.current_state.consecutive_losses == streak
    assert not g.locked
    assert not g.record_trade(trade("d", -0.01))           # replay: no double count
    assert g.current_state.consecutive_losses == 2
    g.record_trade(trade("e", -3.0))
    st = g.current_state
    assert st.locked and "3 consecutive losing trades" in st.lock_reason
    assert [e["kind"] for e in env.j.last_events(2)] == ["trade", "lock"]
    g.record_trade(trade("f", 5.0))                        # exits while locked still count; a win does not unlock
    assert g.locked and g.current_state.consecutive_losses == 0
    with pytest.raises(GuardianError, match="needs a reason"):
        g.unlock(" \t\n ", who="ops")
    msg = g.unlock("reviewed", who="ops")
    assert "unlocked by ops" in msg and not g.locked
    u = env.j.last_events(1, kind="unlock")[0]
    assert u["data"] == {"who": "ops", "reason": "reviewed"} and u["ts"] == env.clock.t
    assert g.unlock("again", who="ops").startswith("not locked")


def test_rebuild_agrees_with_state(env):
    g, j, day2 = env.g, env.j, T + 86_400
    steps = [lambda: g.record_trade(trade("t1", 12.5, equity_after=10_012.5)),
             lambda: g.note_candle(T + 7200, equity=10_050.0),
             lambda: g.record_trade(trade("t2", -3.0, equity_after=10_009.5)),
             lambda: g.record_trade(trade("t3", -4.0, exit_time=day2, equity_after=10_005.5)),
             lambda: g.record_trade(trade("t4", 0.0, exit_time=day2 + 60)),
             lambda: g.unlock("reviewed", who="alice"),
             lambda: g.record_trade(trade("t5", -1.5, exit_time=day2 + 120)),
             lambda: g.approve(env.sig, env.plan, R(env.ctx, equity=10_100.0)),
             lambda: g.record_trade(trade("t6", 2.0, exit_time=day2 + 180, equity_after=10_020.0))]
    for i, step in enumerate(steps):
        step()
        st = g.current_state
        rb = G.GuardianState.from_rebuild(j.rebuild_guardian_state(day=st.day), st.updated_at)
        assert rb.consecutive_losses == st.consecutive_losses, i
        assert (rb.trading, rb.locked_since, rb.lock_reason) == (st.trading, st.locked_since, st.lock_reason), i
        assert math.isclose(rb.total_pnl, st.total_pnl) and math.isclose(rb.day_pnl, st.day_pnl), i
        assert rb.equity_high_water == st.equity_high_water, i
        assert rb.last_candle == st.last_candle, i
    assert (st.day, st.day_pnl, st.total_pnl) == ("2024-01-02", -4.0 + 0.0 - 1.5 + 2.0, 6.0)
    assert st.equity_high_water == 10_100.0 and st.consecutive_losses == 0 and not st.locked
    # the file on disk is the same state
    assert G.load_state(env.dir / "state.json") == st


def test_state_behind_journal_takes_stricter_side(env):
    _lock(env, 3)
    good = read_state(env.dir / "state.json")
    # simulate a crash between the journal write and the state write: an older, unlocked state on disk
    older = json.loads(json.dumps(good))
    older.update(consecutive_losses=0, lock={"locked": False, "since": None, "reason": None})
    older["pnl"]["total"] = 0.0
    older["updated_at"] = env.j.last_events(1, kind="trade")[0]["ts"] - 1     # saved before the last journaled trade
    G.write_state_atomic(env.dir / "state.json", older)
    g2 = Guardian(env.s, env.dir, env.j, clock=env.clock)
    st = g2.current_state
    assert st.locked and st.consecutive_losses == 3 and st.total_pnl == -3.0
    assert env.j.last_events(1, kind="state_repaired")
    assert set(g2.approve(env.sig, env.plan, env.ctx).reasons) == {Reason.KILL_SWITCH}


# ----------------------------------------------------------------------------------------------- fail-closed loading
def _valid(env):
    return read_state(env.dir / "state.json")


CORRUPTIONS = {
    "empty": lambda env: b"",
    "truncated": lambda env: json.dumps(_valid(env)).encode()[:40],
    "garbage": lambda env: os.urandom(64),
    "not_an_object": lambda env: b"[1, 2, 3]",
    "losses_is_text": lambda env: json.dumps({**_valid(env), "consecutive_losses": "2"}).encode(),
    "losses_is_bool": lambda env: json.dumps({**_valid(env), "consecutive_losses": True}).encode(),
    "negative_losses": lambda env: json.dumps({**_valid(env), "consecutive_losses": -1}).encode(),
    "locked_is_text": lambda env: json.dumps({**_valid(env), "lock": {"locked": "no", "since": None, "reason": None}}).encode(),
    "nan_pnl": lambda env: json.dumps({**_valid(env), "pnl": {"day": "2024-01-01", "day_pnl": float("nan"), "total": 0}}).encode(),
    "unknown_schema": lambda env: json.dumps({**_valid(env), "schema_version": 2}).encode(),
    "missing_key": lambda env: json.dumps({k: v for k, v in _valid(env).items() if k != "lock"}).encode(),
    "extra_key": lambda env: json.dumps({**_valid(env), "surprise": 1}).encode(),
    "missing_file": None,
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_unreadable_state_locks_and_is_kept(env, name):
    env.g.record_trade(trade("w", 7.0))                # history in the journal
    path = env.dir / "state.json"
    if CORRUPTIONS[name] is None:
        path.unlink()
        raw = None
    else:
        raw = CORRUPTIONS[name](env)
        path.write_bytes(raw)
    g2 = Guardian(env.s, env.dir, Journal(env.dir / "journal.sqlite", clock=env.clock), clock=env.clock)
    st = g2.current_state
    assert st.locked, name
    assert st.lock_reason.startswith("state.json unreadable: ") and "cryptobot unlock --reason" in st.lock_reason
    assert "\n" not in st.lock_reason
    assert st.total_pnl == 7.0                   # numbers come from the journal
    assert set(g2.approve(env.sig, env.plan, env.ctx).reasons) == {Reason.KILL_SWITCH}
    g2.record_trade(trade("x", -1.0))                  # exits while locked are journaled; the file is not touched
    assert (path.read_bytes() if raw is not None else path.exists()) == (raw if raw is not None else False)
    # a restart does not clear it, nor journal the same lock twice
    g3 = Guardian(env.s, env.dir, env.j, clock=env.clock)
    assert g3.locked and len(env.j.last_events(100, kind="lock")) == 1
    env.clock.t += 1
    msg = g3.unlock("disk checked, state rebuilt from journal", who="ops")
    corrupt = list(env.dir.glob("state.json.corrupt-*"))
    if raw is not None:
        assert len(corrupt) == 1 and corrupt[0].read_bytes() == raw and corrupt[0].name in msg
    else:
        assert corrupt == []
    st = G.load_state(path)
    assert not st.locked and st.total_pnl == 6.0 and st.consecutive_losses == 0
    assert Guardian(env.s, env.dir, env.j, clock=env.clock).approve(env.sig, env.plan, env.ctx)


def test_corrupt_state_never_resets_existing_lock(env):
    _lock(env, 3)
    (env.dir / "state.json").write_text("{")
    g2 = Guardian(env.s, env.dir, env.j, clock=env.clock)
    assert g2.locked
    rb = env.j.rebuild_guardian_state()
    assert rb["lock"]["locked"] and "consecutive losing" in rb["lock"]["reason"]   # the first lock stays on record
    (env.dir / "state.json").write_text("{")      # fixing the file by hand does not unlock either:
    G.write_state_atomic(env.dir / "state.json", {**G.fresh_state(T), "updated_at": T})
    assert Guardian(env.s, env.dir, env.j, clock=env.clock).locked


def test_first_run_fresh_and_existing_state_with_empty_journal_locks(tmp_path):
    e = make_env(tmp_path)
    assert not e.g.locked and e.j.has_history()           # the first run journals itself
    assert e.g.approve(e.sig, e.plan, e.ctx)
    # state.json present but the journal replaced by an empty one -> locked
    e.j.close()
    for p in tmp_path.glob("journal.sqlite*"):
        p.unlink()
    g = Guardian(e.s, tmp_path, Journal(tmp_path / "journal.sqlite", clock=e.clock), clock=e.clock)
    assert g.locked and "journal is empty" in g.current_state.lock_reason


# ----------------------------------------------------------------------------------------------- CLI helpers
def test_status_report_read_only_and_unlock_cli(tmp_path):
    sd = tmp_path / "var"
    s = Settings(state_dir=sd)
    d = status_report(s, now=T)
    assert d["never_run"] and not d["locked"] and not sd.exists()          # status never creates anything
    assert "never run" in format_status(d)
    e = make_env(sd)
    e.g.approve(e.sig, e.plan, e.ctx)
    a = e.g.approve(R(e.sig, candle_time=T + 3600), e.plan, R(e.ctx, now=T + 3610, last_candle_close=T + 3600)) \
        if not setattr(e.clock, "t", T + 3610) else None
    cid = a.client_order_id
    e.g.redeem(a)
    e.j.record_order_status(cid, "closed", filled=a.amount, average=a.price)
    _lock(e, 3)
    before = sorted(p.name for p in sd.iterdir())
    d = status_report(s, now=T + 3700)
    assert sorted(p.name for p in sd.iterdir()) == before
    assert d["locked"] and "3 consecutive" in d["lock_reason"] and d["consecutive_losses"] == 3
    assert d["pnl_total"] == -3.0 and d["pnl_day"] == -3.0 and d["pnl_day_date"] == "2024-01-01"
    assert d["open_positions"][0]["client_order_id"] == cid and d["last_candle_age_s"] == 100.0
    json.dumps(d)                                                            # --json works without default=str
    screen = format_status(d)
    assert "LOCKED" in screen and "BTC/USDT" in screen and str(sd) in screen and "100 s ago" in screen
    with pytest.raises(GuardianError, match="needs a reason"):
        unlock_cli(s, "  ")
    msg = unlock_cli(s, "looked at the stops", who="carol")
    assert "unlocked by carol" in msg and not status_report(s, now=T + 3700)["locked"]
    assert e.j.last_events(1, kind="unlock")[0]["data"]["who"] == "carol"
    # unreadable state shows as locked in status, without touching the file
    (sd / "state.json").write_text("nope")
    d = status_report(s, now=T + 3700)
    assert d["locked"] and d["state_error"] and (sd / "state.json").read_text() == "nope"
    assert "PROBLEM" in format_status(d)


def test_cli_status_and_unlock(tmp_path, monkeypatch, capsys):
    from cryptobot import cli
    monkeypatch.setenv("CRYPTOBOT_STATE_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    e = make_env(tmp_path)
    _lock(e, 3)
    assert cli.main(["status", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["locked"] and out["consecutive_losses"] == 3
    assert cli.main(["unlock", "--reason", "  "]) == 1
    assert "needs a reason" in capsys.readouterr().err
    assert cli.main(["unlock", "--reason", "reviewed"]) == 0
    assert "unlocked by" in capsys.readouterr().out
    assert cli.main(["status"]) == 0
    assert "unlocked: entries allowed" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------- one entry gate
def _runner_decision(e):
    "What the runner decides: a new process's Journal and Guardian on the state dir (as start_runner builds them),"
    "asked to approve an entry. A Denial/Approval, or the one line the runner stops with when it cannot start."
    e.clock.t += 1
    try:
        j = Journal(e.dir / "journal.sqlite", clock=e.clock)
    except JournalError as err:
        return str(err)
    try:
        close = e.clock.t - 10                                        # a fresh candle, so only the gate can deny
        return Guardian(e.s, e.dir, j, clock=e.clock).approve(R(e.sig, candle_time=close), e.plan,
                                                              R(e.ctx, now=e.clock.t, last_candle_close=close))
    finally:
        j.close()


def _headline(d):
    return format_status(d).splitlines()[1]


def test_status_and_runner_agree_when_the_journal_is_deleted(tmp_path):
    e = make_env(tmp_path)
    e.g.record_trade(trade("w", 5.0))
    e.j.close()
    for p in tmp_path.glob("journal.sqlite*"):
        p.unlink()
    d = status_report(e.s, now=e.clock.t)
    assert d["locked"] and not d["entries_allowed"] and _headline(d).startswith("LOCKED"), _headline(d)
    assert "journal is empty or missing" in d["lock_reason"] and not (tmp_path / "journal.sqlite").exists()
    dec = _runner_decision(e)
    assert isinstance(dec, Denial) and dec.reasons == (Reason.KILL_SWITCH,)
    assert dec.failures[0].detail == d["lock_reason"]                 # the same words, from the same function
    assert status_report(e.s, now=e.clock.t)["lock_reason"] == d["lock_reason"]


def test_status_and_runner_agree_when_the_journal_is_corrupt(tmp_path):
    e = make_env(tmp_path)
    e.j.close()
    for p in tmp_path.glob("journal.sqlite-*"):
        p.unlink()
    (tmp_path / "journal.sqlite").write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    d = status_report(e.s, now=e.clock.t)
    assert d["locked"] and _headline(d).startswith("LOCKED") and "entries allowed" not in format_status(d)
    dec = _runner_decision(e)                                         # the runner cannot even open it
    assert isinstance(dec, str) and "not a usable SQLite database" in dec and d["lock_reason"] == dec


def test_hand_lowered_loss_streak_locks_status_and_runner(tmp_path):
    e = make_env(tmp_path)                                            # kill switch at 3
    _lock(e, 2)
    e.clock.t += 3600
    e.g.note_candle(T + 3600, 10_000.0)                               # state.json saved after the last trade
    st = read_state(tmp_path / "state.json")
    st["consecutive_losses"] = 0                                      # "fixed" by hand
    (tmp_path / "state.json").write_text(json.dumps(st))
    d = status_report(e.s, now=e.clock.t)
    assert d["locked"] and _headline(d).startswith("LOCKED") and d["consecutive_losses"] == 2
    assert "loss streak 0 in state.json, 2 in the journal" in d["lock_reason"] and "edited by hand" in d["lock_reason"]
    dec = _runner_decision(e)
    assert isinstance(dec, Denial) and dec.reasons == (Reason.KILL_SWITCH,) and dec.failures[0].detail == d["lock_reason"]
    st = G.load_state(tmp_path / "state.json")                        # the runner repaired and locked, journaled once
    assert st.consecutive_losses == 2 and st.lock_reason == d["lock_reason"]
    assert [x["message"] for x in e.j.last_events(5, kind="lock")] == [d["lock_reason"]]
    assert status_report(e.s, now=e.clock.t)["lock_reason"] == d["lock_reason"]
    assert "unlocked by" in unlock_cli(e.s, "looked at the edit", who="ops")
    assert not status_report(e.s, now=e.clock.t)["locked"] and isinstance(_runner_decision(e), Approval)


def test_state_saved_before_the_last_trade_is_repaired_not_locked(tmp_path):
    "A crash between the journal write and the state write leaves an OLDER state.json: repaired, entries allowed."
    e = make_env(tmp_path)
    _lock(e, 1)
    older = read_state(tmp_path / "state.json")
    e.clock.t += 60
    e.g.record_trade(trade("L1", -1.0))
    G.write_state_atomic(tmp_path / "state.json", older)              # the second trade's state write never happened
    d = status_report(e.s, now=e.clock.t)
    assert not d["locked"] and d["consecutive_losses"] == 2 and _headline(d) == "lock       unlocked: entries allowed"
    assert isinstance(_runner_decision(e), Approval)
    assert read_state(tmp_path / "state.json")["consecutive_losses"] == 2


def test_state_saved_before_a_win_takes_the_journals_shorter_streak(tmp_path):
    "A kill between journaling a WIN and saving state.json leaves an older state.json with a longer streak: the journal"
    "(written first) is the truth, so the streak converges to it instead of staying too high for ever (found by the soak)."
    e = make_env(tmp_path)
    _lock(e, 2)                                                     # two losses: streak 2, not locked
    older = read_state(tmp_path / "state.json")
    e.clock.t += 60
    e.g.record_trade(trade("W1", +1.0))                             # a win resets the streak in the journal ...
    G.write_state_atomic(tmp_path / "state.json", older)            # ... but its state write never happened
    assert e.j.rebuild_guardian_state()["consecutive_losses"] == 0
    d = status_report(e.s, now=e.clock.t)
    assert not d["locked"], d
    assert isinstance(_runner_decision(e), Approval)
    assert read_state(tmp_path / "state.json")["consecutive_losses"] == 0


def test_unlock_records_the_uid_account_not_USER(env, monkeypatch):
    import pwd
    _lock(env, 3)
    me = pwd.getpwuid(os.getuid()).pw_name
    monkeypatch.setenv("USER", "mallory")
    monkeypatch.setenv("LOGNAME", "mallory")
    root = pwd.getpwuid(0).pw_name                     # an account in the password database
    monkeypatch.setenv("SUDO_USER", root)
    msg = unlock_cli(env.s, "reviewed the losses")
    who = env.j.last_events(1, kind="unlock")[0]["data"]["who"]
    assert who == f"{me} (uid {os.getuid()}, SUDO_USER={root})" and "mallory" not in who and f"unlocked by {who}" in msg
    _lock(env, 6)
    monkeypatch.setenv("SUDO_USER", "alice-nosuchuser")   # anyone can set it: not an account, so not believed
    unlock_cli(env.s, "reviewed")
    assert env.j.last_events(1, kind="unlock")[0]["data"]["who"] == \
        f'{me} (uid {os.getuid()}, unverified SUDO_USER="alice-nosuchuser": not in the password database)'
    _lock(env, 9)
    monkeypatch.delenv("SUDO_USER")
    unlock_cli(env.s, "again")
    assert env.j.last_events(1, kind="unlock")[0]["data"]["who"] == f"{me} (uid {os.getuid()})"


# ----------------------------------------------------------------------------------------------- typed state
# state.json exactly as the dict-based Guardian (before GuardianState) wrote it: json.dumps(indent=1, sort_keys=True)
LEGACY_STATE = ('{\n "consecutive_losses": 3,\n "equity_high_water": 10100.0,\n "last_candle": 1704070800.0,\n'
                ' "lock": {\n  "locked": true,\n  "reason": "kill switch: 3 consecutive losing trades (limit 3); '
                'investigate, then cryptobot unlock --reason TEXT",\n  "since": 1704070810.0\n },\n "pnl": {\n'
                '  "day": "2024-01-01",\n  "day_pnl": -3.0,\n  "total": -3.0\n },\n "schema_version": 1,\n'
                ' "updated_at": 1704070810.0\n}\n')


def test_state_json_written_by_the_dict_guardian_loads_typed_and_writes_back_identically(tmp_path):
    (tmp_path / "state.json").write_text(LEGACY_STATE)
    st = G.load_state(tmp_path / "state.json")
    assert isinstance(st, G.GuardianState) and st.trading is G.TradingState.LOCKED and st.locked
    assert (st.consecutive_losses, st.total_pnl, st.day, st.locked_since) == (3, -3.0, "2024-01-01", 1_704_070_810.0)
    assert st.to_json() == LEGACY_STATE and G.GuardianState.from_json(st.to_json()) == st
    assert read_state(tmp_path / "state.json") == json.loads(LEGACY_STATE) == st.as_dict()
    G.write_state_atomic(tmp_path / "again.json", st)
    assert (tmp_path / "again.json").read_text() == LEGACY_STATE


def test_guardian_state_is_a_frozen_typed_object_with_a_dict_accessor(env):
    _lock(env, 3)
    st = env.g.current_state
    assert isinstance(st, G.GuardianState) and st.trading is G.TradingState.LOCKED and st.consecutive_losses == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.consecutive_losses = 0
    assert env.g.state == st.as_dict() == read_state(env.dir / "state.json")      # the dict readers still work
    assert env.g.state["lock"]["locked"] is True
    env.g.unlock("reviewed", who="ops")
    assert env.g.current_state.trading is G.TradingState.ACTIVE and st.locked        # the old object did not change
    with pytest.raises(G.StateError, match="lock is set without a reason"):
        G.GuardianState(trading=G.TradingState.LOCKED)
    with pytest.raises(G.StateError, match="schema_version 2"):
        G.GuardianState.from_json(LEGACY_STATE.replace('"schema_version": 1', '"schema_version": 2'))
