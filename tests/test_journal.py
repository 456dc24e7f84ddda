"Journal: WAL + synchronous=FULL, migrations, idempotent inserts (also across processes), newer schema refused."
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from cryptobot.journal import (SCHEMA_VERSION, ClosedTrade, Journal, JournalError, MIGRATIONS)

T0 = 1_704_067_200.0  # 2024-01-01 00:00 UTC


def _trade(key, pnl, h=0, equity_after=None):
    return ClosedTrade(trade_key=key, symbol="BTC/USDT", entry_time=T0 + h * 3600, exit_time=T0 + h * 3600 + 1800,
                       entry_price=100.0, exit_price=100.0 + pnl, amount=1.0, fees=0.2, pnl=pnl,
                       exit_reason="model", equity_after=equity_after)


def test_wal_and_full_sync_and_busy_timeout(tmp_path):
    j = Journal(tmp_path / "j.sqlite")
    assert j.journal_mode == "wal"
    assert j.synchronous == 2  # FULL
    assert j._con.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000
    j.log_event("start", "hello")
    j.close()
    # WAL is persistent in the file header: a plain connection sees it too
    con = sqlite3.connect(tmp_path / "j.sqlite")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    con.close()


def test_migration_from_empty_file(tmp_path):
    p = tmp_path / "empty.sqlite"
    p.write_bytes(b"")
    j = Journal(p)
    assert j.schema_version == SCHEMA_VERSION == len(MIGRATIONS)
    tables = {r[0] for r in j._con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"events", "intents", "orders", "fills", "trades", "decisions", "redemptions", "locks", "unlocks",
            "marks", "reconciliations", "poll_errors", "feature_rows"} <= tables
    assert not j.has_history()
    j.close()
    # reopening does not re-run migrations (would fail on CREATE TABLE) and keeps the version
    assert Journal(p).schema_version == SCHEMA_VERSION


def test_refuses_newer_schema_in_one_line(tmp_path):
    p = tmp_path / "new.sqlite"
    Journal(p).close()
    con = sqlite3.connect(p)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 3}")
    con.commit()
    con.close()
    with pytest.raises(JournalError, match="newer than this cryptobot knows") as e:
        Journal(p)
    assert "\n" not in str(e.value)
    with pytest.raises(JournalError, match="newer"):
        Journal(p, readonly=True)


def test_not_a_database_is_one_line(tmp_path):
    p = tmp_path / "junk.sqlite"
    p.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(JournalError, match="not a usable SQLite database") as e:
        Journal(p)
    assert "\n" not in str(e.value)


def test_idempotent_inserts(tmp_path):
    j = Journal(tmp_path / "j.sqlite")
    kw = dict(client_order_id="cb-e-1", symbol="BTC/USDT", side="buy", type="market", amount=0.5, price=100.0,
              stop_price=98.5, purpose="entry", candle_time=T0)
    assert j.record_intent(**kw) and not j.record_intent(**kw)
    with pytest.raises(JournalError, match="different price"):
        j.record_intent(**{**kw, "price": 101.0})
    assert j.record_fill("f1", "cb-e-1", 100.0, 0.5, fee=0.05) and not j.record_fill("f1", "cb-e-1", 100.0, 0.5, fee=0.05)
    with pytest.raises(JournalError, match="different"):
        j.record_fill("f1", "cb-e-1", 100.0, 0.4, fee=0.05)
    assert j.record_trade(_trade("cb-e-1", -1.0)) and not j.record_trade(_trade("cb-e-1", -1.0))
    with pytest.raises(JournalError, match="different .*pnl"):
        j.record_trade(_trade("cb-e-1", -2.0))
    assert j.record_feature_row(T0, "fp", {"a": 1.0}) and not j.record_feature_row(T0, "fp", {"a": 1.0})
    assert j.record_redemption("ap1", "cb-e-2") and not j.record_redemption("ap1", "cb-e-2")
    assert not j.record_redemption("ap2", "cb-e-2")  # same client order id through another approval
    counts = {t: j._con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
              for t in ("intents", "fills", "trades", "feature_rows", "redemptions")}
    assert counts == {"intents": 1, "fills": 1, "trades": 1, "feature_rows": 1, "redemptions": 1}
    # a failed (conflicting) insert rolled back completely: no orphan event lines
    kinds = [e["kind"] for e in j.last_events(100)]
    assert kinds == ["intent", "fill", "trade", "features", "redeem"]


def test_open_intents_final_statuses(tmp_path):
    j = Journal(tmp_path / "j.sqlite")
    for i, purpose in enumerate(["entry", "stop", "exit", "emergency_exit"]):
        j.record_intent(f"c{i}", "BTC/USDT", "buy" if purpose == "entry" else "sell", "market", 1.0, purpose=purpose)
    j.record_order_status("c0", "closed", filled=1.0, average=100.0)
    j.record_order_status("c1", "open", filled=0.0)
    j.record_order_status("c2", "CANCELED")
    assert [r["client_order_id"] for r in j.open_intents()] == ["c1", "c3"]
    assert j.open_intents("ETH/USDT") == []
    assert [p["client_order_id"] for p in j.open_positions()] == ["c0"]


def test_rebuild_break_even_and_unlock(tmp_path):
    j = Journal(tmp_path / "j.sqlite")
    for k, pnl in [("a", 3.0), ("b", -1.0), ("c", 0.0)]:
        j.record_trade(_trade(k, pnl))
    s = j.rebuild_guardian_state(day="2024-01-01")
    assert s["consecutive_losses"] == 2 and s["pnl"]["total"] == 2.0 and s["pnl"]["day_pnl"] == 2.0
    j.record_lock("manual")
    j.record_lock("second lock keeps the first since/reason")
    s = j.rebuild_guardian_state(day="2024-01-01")
    assert s["lock"]["locked"] and s["lock"]["reason"] == "manual"
    j.record_unlock("ops", "checked")
    j.record_trade(_trade("d", -1.0))
    s = j.rebuild_guardian_state(day="2024-01-01")
    assert s["consecutive_losses"] == 1 and not s["lock"]["locked"] and s["trades"] == 4


WRITER = textwrap.dedent("""
    import sys
    from cryptobot.journal import Journal
    j = Journal(sys.argv[1])
    w = int(sys.argv[2])
    for i in range(100):
        j.record_intent(f"own-{w}-{i}", "BTC/USDT", "buy", "market", 1.0, purpose="entry")
        j.record_intent(f"shared-{i}", "BTC/USDT", "sell", "market", 1.0, purpose="exit")  # every writer replays it
        j.record_fill(f"t-{i}", f"shared-{i}", 100.0, 1.0)
    print("ok")
""")


def test_concurrent_processes_no_duplicates(tmp_path):
    p = tmp_path / "j.sqlite"
    Journal(p).close()
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(p), str(w)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for w in range(4)]
    outs = [pr.communicate(timeout=60) for pr in procs]
    assert all(pr.returncode == 0 for pr in procs), outs
    j = Journal(p)
    q = lambda sql: j._con.execute(sql).fetchone()[0]
    assert q("SELECT COUNT(*) FROM intents") == 400 + 100
    assert q("SELECT COUNT(*) FROM fills") == 100
    assert q("SELECT COUNT(*) FROM events") == 600
    assert q("PRAGMA integrity_check") == "ok"


def test_readonly_refuses_unmigrated_and_missing(tmp_path):
    with pytest.raises(JournalError, match="does not exist"):
        Journal(tmp_path / "nope.sqlite", readonly=True)
    (tmp_path / "old.sqlite").write_bytes(b"")
    with pytest.raises(JournalError, match="expects 1; open it read-write once"):
        Journal(tmp_path / "old.sqlite", readonly=True)
    with pytest.raises(JournalError, match="read-only"):
        Journal(tmp_path / "old.sqlite").close() or Journal(tmp_path / "old.sqlite", readonly=True).log_event("x")


# ------------------------------------------------------------------ read-only / foreign state dir vs a corrupt journal
def _state_dir_with_history():
    "A real journal with a lock on record, in a fresh folder under /tmp that other users may traverse (pytest's are 0700)."
    import os
    import tempfile
    from pathlib import Path
    d = Path(tempfile.mkdtemp(prefix="cb-ro-"))
    os.chmod(d, 0o755)
    sd = d / "var"
    sd.mkdir()
    with Journal(sd / "journal.sqlite") as j:
        j.record_trade(_trade("a", -1.0))
        j.record_lock("kill switch: evidence that must not be thrown away")
    return d, sd


OPEN_RW = "from cryptobot.journal import Journal, JournalError\ntry:\n    Journal({p!r})\nexcept JournalError as e:\n    print(e)\n"


def _as_other_user(code):
    """Run `code` in a fresh interpreter that, when we are root (root ignores file permissions), first imports what it
    needs and then drops to user nobody (the interpreter itself lives under /root, which nobody may not read)."""
    import os
    if os.geteuid() == 0:
        code = ("import os, sqlite3, cryptobot.journal\nos.setgroups([])\nos.setgid(65534)\nos.setuid(65534)\n"
                "assert os.getuid() == 65534\n" + code)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("case", ["dir_0555", "file_0444_in_0555_dir"])
def test_permission_denied_is_not_called_corruption(case):
    "A state dir the runner's user may not write: the message names the path and errno and keeps the journal."
    import os
    import shutil
    d, sd = _state_dir_with_history()
    p = sd / "journal.sqlite"
    try:
        os.chmod(p, 0o666 if case == "dir_0555" else 0o444)       # dir_0555: the file is writable, its folder is not
        os.chmod(sd, 0o555)
        r = _as_other_user(OPEN_RW.format(p=str(p)))
        msg = r.stdout.strip()
        assert r.returncode == 0 and msg, r.stderr
        assert "[Errno 13 EACCES] Permission denied" in msg and "not a usable SQLite database" not in msg, msg
        assert "do not move it aside" in msg and "keep it as evidence" not in msg, msg
        assert (str(sd) if case == "dir_0555" else str(p)) in msg, msg
        # the reader (status, dashboard, audit) still reads it, as that other user, and creates nothing
        r = _as_other_user(f"from cryptobot.journal import Journal\nprint(Journal({str(p)!r}, readonly=True)"
                           f".rebuild_guardian_state()['lock']['locked'])")
        assert r.stdout.strip() == "True", r.stderr
        assert sorted(x.name for x in sd.iterdir()) == ["journal.sqlite"]
    finally:
        os.chmod(sd, 0o755)
        shutil.rmtree(d)


def test_read_only_mount_is_not_called_corruption():
    "A state dir on a read-only mount (a private bind mount in its own namespace): EROFS, named, journal kept."
    import os
    import shutil
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare for a private read-only bind mount")
    d, sd = _state_dir_with_history()
    ro = d / "ro"
    ro.mkdir()
    try:
        probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind -o ro {sd} {ro} && touch {ro}/x"],
                               capture_output=True, text=True)
        if "Read-only file system" not in probe.stderr:
            pytest.skip(f"no private read-only bind mount here: {probe.stderr.strip()[:200]}")
        p = ro / "journal.sqlite"
        r = subprocess.run(["unshare", "-m", "sh", "-c", f'mount --bind -o ro {sd} {ro} && exec "$0" "$@"',
                            sys.executable, "-c", OPEN_RW.format(p=str(p))], capture_output=True, text=True, timeout=60)
        msg = r.stdout.strip()
        assert "[Errno 30 EROFS] Read-only file system" in msg and str(p) in msg, (msg, r.stderr)
        assert "remount it read-write" in msg and "do not move it aside" in msg, msg
        assert "not a usable SQLite database" not in msg
    finally:
        shutil.rmtree(d)


def test_really_corrupt_journal_still_says_move_it_aside(tmp_path):
    p = tmp_path / "journal.sqlite"
    p.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)          # a real header, garbage after it
    for ro in (False, True):
        with pytest.raises(JournalError) as e:
            Journal(p, readonly=ro)
        msg = str(e.value)
        assert "not a usable SQLite database" in msg and "move it aside (keep it as evidence)" in msg, msg
        assert "do not move" not in msg and str(p) in msg


# ---------------------------------------------------------------- order status: one enum, one transition table (issue 10)
from cryptobot.journal import ORDER_TRANSITIONS, OrderStatus, OrderStatusError  # noqa: E402

# one way to observe each state as the executor does (a ccxt unified dict: status + filled)
_OBSERVED = {OrderStatus.NEW: ("open", 0.0), OrderStatus.PARTIALLY_FILLED: ("open", 0.5),
             OrderStatus.FILLED: ("closed", 1.0), OrderStatus.CANCELED: ("canceled", 0.5),
             OrderStatus.EXPIRED: ("expired", 0.5), OrderStatus.REJECTED: ("rejected", None)}


@pytest.mark.parametrize("old,new", [(o, n) for o, ns in ORDER_TRANSITIONS.items() for n in sorted(ns, key=list(OrderStatus).index)],
                         ids=lambda s: getattr(s, "name", "UNSEEN"))
def test_every_allowed_order_transition_is_journaled(tmp_path, old, new):
    j = Journal(tmp_path / "j.sqlite")
    if old is not None:
        assert j.record_order_status("c1", *_OBSERVED[old][:1], filled=_OBSERVED[old][1])
    status, filled = _OBSERVED[new]
    if old is OrderStatus.PARTIALLY_FILLED and new is OrderStatus.PARTIALLY_FILLED:
        filled = 0.75
    assert j.record_order_status("c1", status, exchange_id="9", filled=filled)
    last = j.select("SELECT status, filled FROM orders WHERE client_order_id = 'c1' ORDER BY id DESC LIMIT 1")[0]
    assert OrderStatus.parse(last["status"], last["filled"]) is new and last["status"] == new.unified


@pytest.mark.parametrize("old,new", [(o, n) for o in OrderStatus for n in OrderStatus
                                     if n not in ORDER_TRANSITIONS[o] and n is not o], ids=lambda s: s.name)
def test_order_transition_outside_the_table_raises_and_writes_nothing(tmp_path, old, new):
    j = Journal(tmp_path / "j.sqlite")
    j.record_order_status("c1", _OBSERVED[old][0], filled=_OBSERVED[old][1])
    n = j.select("SELECT COUNT(*) AS n FROM orders")[0]["n"]
    with pytest.raises(OrderStatusError, match=f"c1: order status {old.name} -> {new.name} is not allowed"):
        j.record_order_status("c1", _OBSERVED[new][0], filled=_OBSERVED[new][1])
    assert j.select("SELECT COUNT(*) AS n FROM orders")[0]["n"] == n          # nothing half-written
    with pytest.raises(OrderStatusError, match=f"{old.name} -> {new.name} is not allowed"):
        old.to(new)                                                          # the emulator's move, same table


def test_old_journal_spellings_are_read_not_lost(tmp_path):
    "A journal written before the enum may hold 'cancelled' or Binance's raw 'filled': both read as final."
    j = Journal(tmp_path / "j.sqlite")
    for cid in ("old-1", "old-2", "old-3"):
        j.record_intent(cid, "BTC/USDT", "sell", "market", 1.0, purpose="exit")
    with j._tx() as con:                                         # rows as an older version wrote them
        for cid, st in (("old-1", "cancelled"), ("old-2", "filled"), ("old-3", "open")):
            eid = j._event(con, "order", f"{cid} {st}", {"client_order_id": cid})
            con.execute("INSERT INTO orders (event_id, client_order_id, status, filled, ts) VALUES (?,?,?,?,?)",
                        (eid, cid, st, 0.0, T0))
    assert [r["client_order_id"] for r in j.open_intents()] == ["old-3"]
    assert [r["status"] for r in j.select("SELECT status FROM orders ORDER BY id")] == ["cancelled", "filled", "open"]
    with pytest.raises(OrderStatusError, match="old-1: order status CANCELED -> FILLED is not allowed"):
        j.record_order_status("old-1", "closed", filled=1.0)
    assert j.record_order_status("old-3", "CANCELED", filled=0.0)        # Binance's raw spelling, normalised
    assert j.select("SELECT status FROM orders ORDER BY id DESC LIMIT 1")[0]["status"] == "canceled"
    assert not j.open_intents()
