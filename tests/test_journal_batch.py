"""Journal.batch (issue 13, speed): a candle's bookkeeping in one transaction. A SIGKILL inside a batch loses only
the held-back rows after the last durable write (never an intent, nor what came before one), and a batch never
blocks another process's writer for longer than its hold time."""
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

from cryptobot.journal import Journal

T0 = 1_704_067_200.0

KILLED_IN_BATCH = textwrap.dedent("""
    import os, signal, sys
    from cryptobot.journal import Journal
    j = Journal(sys.argv[1])
    j.log_event("startup", "committed at once")
    with j.batch():
        j.log_event("signal", "enter", {"candle_time": 1.0})
        j.record_feature_row(1.0, "f" * 64, {"ret_1": 0.1})
        j.record_decision("a-1", True, [], symbol="BTC/USDT", side="buy", candle_time=1.0, client_order_id="c-1")
        j.record_intent("c-1", "BTC/USDT", "buy", "market", 1.0, candle_time=1.0)   # before the send: durable
        print("intent", flush=True)
        j.log_event("stop_check", "ok")
        j.record_mark(1000.0, 1.0)
        j.log_event("candle_done", "done", {"candle_time": 1.0})
        os.kill(os.getpid(), signal.SIGKILL)
""")


def _kinds(path) -> list[str]:
    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return [r[0] for r in con.execute("SELECT kind FROM events ORDER BY id")]
    finally:
        con.close()


def test_sigkill_inside_a_batch_loses_only_the_held_back_suffix(tmp_path):
    p = tmp_path / "j.sqlite"
    r = subprocess.run([sys.executable, "-c", KILLED_IN_BATCH, str(p)], capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL and "intent" in r.stdout, r.stderr
    # the intent and everything before it survived; the held-back rows after it are gone (the runner redoes them)
    assert _kinds(p) == ["startup", "signal", "features", "decision", "intent"]
    j = Journal(p)
    assert [i["client_order_id"] for i in j.open_intents()] == ["c-1"]
    assert j.last_events(1, kind="candle_done") == []
    j.close()


HOLDER = textwrap.dedent("""
    import sys, time
    from cryptobot.journal import Journal
    j = Journal(sys.argv[1])
    with j.batch():
        j.log_event("signal", "held back")
        print("holding", flush=True)
        time.sleep(8)                       # a batch left open (a slow network call inside a tick)
    j.close()
""")


def test_an_open_batch_never_blocks_another_writer_past_its_hold(tmp_path):
    p = tmp_path / "j.sqlite"
    Journal(p).close()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(p)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        j = Journal(p, timeout_s=4.0)       # a `cryptobot unlock` while the runner's batch is open: it gets through
        j.record_unlock("operator", "checked")
        assert holder.poll() is None        # the holder's batch is still open: its hold timer committed it
        assert _kinds(p)[:1] == ["signal"]
        j.close()
    finally:
        holder.kill()
        holder.wait()
