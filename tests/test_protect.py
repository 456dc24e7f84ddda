"""Protect first, and never a loop of orders (issue 18, case 1), on the executor with the REAL ccxt.binance client
against the emulator on 127.0.0.1: a stop refused AND its emergency exit refused (no base coin free, an exchange rule the
executor did not know), a journaled position the account does not hold, an entry whose fills fail to journal."""
from __future__ import annotations

from decimal import Decimal

import pytest

from cryptobot.exchange import AccountMismatch
from cryptobot.journal import Journal, JournalError
from cryptobot.emulator import Emulator
from test_exchange import KEY, SECRET, SYM, approve, df, emu, env_for, step  # noqa: F401  (df, emu: test_exchange's fixtures)


def posts(emu) -> int:
    "Order requests the emulator received (refused ones included)."
    return emu.requests["POST /api/v3/order"]


def lock_reason(e) -> str:
    st = e.g.current_state
    return st.lock_reason if st.locked else ""


@pytest.mark.parametrize("cause", ["no_free_coin", "exchange_rule"])
def test_a_refused_stop_and_a_refused_exit_send_a_bounded_number_of_orders_and_lock(tmp_path, emu, df, cause):
    """The stop goes away, the replacement stop is refused, the emergency exit is refused: before, the two called each
    other until RecursionError with a rejected order per turn. Now: at most one stop and one exit per candle, entries
    locked with one line, and no further order on the same candle."""
    e = env_for(tmp_path, emu)
    res = e.ex.enter(approve(e))
    assert res.stop_client_order_id and e.ex.position() is not None
    by_hand = e.client
    by_hand.cancel_order(None, SYM, {"clientOrderId": res.stop_client_order_id})       # the stop goes away
    if cause == "no_free_coin":        # someone offers the coins by hand: the account holds them, none is free
        held = e.ex.position().open_amount
        by_hand.create_order(SYM, "limit", "sell", held, 1_000_000.0, {"newClientOrderId": "by-hand-1"})
    else:                              # the exchange's minimum notional rose since the executor read the markets
        emu._book.filters["min_notional"] = Decimal("1000000")
    n0 = posts(emu)
    what = e.ex.sync()                 # the stop check: stop gone -> replace -> refused -> exit -> refused
    sent = posts(emu) - n0
    if cause == "no_free_coin":        # the stop watch frees the coins (cancels the foreign sell), then places ours
        assert what == "stop_placed" and sent == 1 and not lock_reason(e), (what, sent, lock_reason(e))
        assert [o["clientOrderId"] for o in by_hand.fetch_open_orders(SYM)] == [e.ex.position().stop_cid]
        assert e.ex.sync() == "protected" and posts(emu) - n0 == sent
        return
    assert what == "stop_placed" and 1 <= sent <= 2, (what, sent)
    assert "could not be protected" in lock_reason(e), lock_reason(e)
    assert e.ex.sync() == "unprotected" and posts(emu) - n0 == sent        # same candle: nothing more is sent
    rep = e.ex.reconcile()                                                  # a reconciliation sends nothing either
    assert not rep.ok and posts(emu) - n0 == sent, rep
    step(e, df)                                                             # the next candle: one more bounded try
    assert 1 <= posts(emu) - n0 - sent <= 2
    assert e.ex.position() is not None and e.g.current_state.locked


def test_a_journaled_position_the_account_does_not_hold_is_a_mismatch_and_sends_nothing(tmp_path, emu, df):
    "The journal holds a position, the account holds no coin and no stop (a reset or emptied account): one MISMATCH,"
    "entries locked, zero orders (before: RecursionError after a rejected stop and exit on every turn)."
    e = env_for(tmp_path, emu)
    res = e.ex.enter(approve(e))
    pos = e.ex.position()
    e.client.cancel_order(None, SYM, {"clientOrderId": res.stop_client_order_id})
    with emu._lock:                                                # the coins left the account
        kept = emu._book.free["BTC"]
        emu._book.free["BTC"] = Decimal(0)
    n0 = posts(emu)
    rep = e.ex.reconcile()
    assert not rep.ok and posts(emu) == n0, rep
    [p] = [p for p in rep.problems if "exchange holds 0 BTC" in p]
    assert pos.entry_cid in p and "nothing was sent" in p, p
    assert lock_reason(e).startswith("reconciliation mismatch on BTC/USDT"), lock_reason(e)
    assert e.j.select("SELECT message FROM events WHERE kind = 'reconcile' ORDER BY id DESC LIMIT 1")[0][
        "message"].startswith("MISMATCH")
    assert e.ex.sync() == "mismatch" and e.ex.exit(emu.now.timestamp()) is None
    step(e, df, 2)                                                 # candles go by: still nothing sent
    assert posts(emu) == n0 and e.ex.position() is not None
    with emu._lock:                                                # the coins are back: the stop is placed again
        emu._book.free["BTC"] = kept
    assert e.ex.reconcile().ok and posts(emu) == n0 + 1 and e.ex.position().stop_cid is not None
    assert e.ex.mismatch is None and e.g.current_state.locked     # entries stay locked until a person unlocks


def test_an_entry_whose_fills_fail_to_journal_is_protected_before_the_error(tmp_path, emu, monkeypatch):
    "Journaling the entry's fill raises: the stop is on the exchange (and the position in the journal) before the"
    "error reaches the caller."
    e = env_for(tmp_path, emu)
    a = approve(e)

    def broken(self, *args, **kw):
        raise JournalError("fill BTCUSDT-1 is already journaled with different client_order_id, price, amount, fee")
    monkeypatch.setattr(Journal, "record_fill", broken)
    with pytest.raises(JournalError, match="already journaled"):
        e.ex.enter(a)
    monkeypatch.undo()
    stops = [o for o in emu.orders if o["type"] == "STOP_LOSS_LIMIT" and o["status"] == "NEW"]
    assert len(stops) == 1 and stops[0]["qty"] > 0, emu.orders
    pos = e.ex.position()
    assert pos is not None and pos.entry_cid == a.client_order_id and pos.stop_cid == stops[0]["client_order_id"]
    assert e.ex.reconcile().ok                                 # the fills are read again once the journal takes them
    assert len(e.j.fills(a.client_order_id)) >= 1 and e.j.last_order(a.client_order_id)["status"] == "closed"


def test_check_account_records_the_first_account_and_refuses_another(tmp_path, df):
    "The journal's account is recorded on the first check; a fresh emulator (another uid) is refused before any order."
    with Emulator(df, api_key=KEY, api_secret=SECRET, balances={"USDT": 10_000}, uid=111) as emu:
        e = env_for(tmp_path, emu, reconcile=False)
        assert e.ex.check_account() == {"uid": "111", "account_type": "SPOT"}
        assert e.j.account()["uid"] == "111" and e.j.account()["reason"] == "first run on this account"
        e.ex.check_account()                                    # the same account: fine, nothing new journaled
        assert len(e.j.last_events(10, kind="account")) == 1
        e.j.close()
    with Emulator(df, api_key=KEY, api_secret=SECRET, balances={"USDT": 10_000}) as emu:     # a fresh account
        e = env_for(tmp_path, emu, reconcile=False)
        with pytest.raises(AccountMismatch, match="belongs to exchange account 111"):
            e.ex.check_account()
        assert emu.requests["POST /api/v3/order"] == 0
        assert "exchange account mismatch" in lock_reason(e)


def test_an_account_that_changes_under_a_running_executor_is_a_mismatch(tmp_path, df):
    "The exchange reports another uid mid-run (a testnet reset while the bot runs): reconciliation says so, entries"
    "lock, and a position is left alone (no stop, no exit) until a restart checks the account against the journal."
    with Emulator(df, api_key=KEY, api_secret=SECRET, balances={"USDT": 10_000}, uid=5) as emu:
        e = env_for(tmp_path, emu, reconcile=False)
        e.ex.check_account()
        assert e.ex.reconcile().ok
        e.ex.enter(approve(e))
        n0 = posts(emu)
        emu.uid = 6
        rep = e.ex.reconcile()
        assert not rep.ok and any("now reports account 6" in p for p in rep.problems), rep
        assert e.ex.sync() == "mismatch" and e.ex.exit(emu.now.timestamp()) is None and posts(emu) == n0
        assert "exchange account mismatch on BTC/USDT" in lock_reason(e)
