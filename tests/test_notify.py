"""Alerts (issue 13) end to end: the real apprise `json://` webhook against a real `http.server` receiver on 127.0.0.1,
a real SQLite `Journal` as the failure sink. A receiver that hangs or refuses never blocks `notify()`."""
import http.server
import json
import logging
import socket
import subprocess
import sys
import threading
import time

import pytest

from cryptobot.journal import Journal
from cryptobot.notify import Event, Notifier, NotifyError, format_alert


class Receiver:
    "A loopback webhook. Paths: /ok/... answers 200, /hang/... holds the request until released, /flaky/N/... "
    "answers 500 to the first N posts."

    def __init__(self):
        self.got, self.release, self.lock = [], threading.Event(), threading.Lock()
        rec = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with rec.lock:
                    rec.got.append((self.path, body))
                    n = sum(p == self.path for p, _ in rec.got)
                if self.path.startswith("/hang"):
                    rec.release.wait(30)
                code = 500 if self.path.startswith("/flaky") and n <= int(self.path.split("/")[2]) else 200
                try:
                    self.send_response(code)
                    self.end_headers()
                except OSError:
                    pass

            def log_message(self, *a):
                pass

        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.srv.daemon_threads = True
        self.port = self.srv.server_address[1]
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def url(self, path):
        return f"json://127.0.0.1:{self.port}{path}"

    def close(self):
        self.release.set()
        self.srv.shutdown()
        self.srv.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def journal(tmp_path):
    j = Journal(tmp_path / "journal.sqlite")
    yield j
    j.close()


def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def events(journal, kind):
    return journal.last_events(1000, kind)


FACTS = {
    Event.KILL_LOCKED: dict(symbol="BTC/USDT", reason="3 consecutive losses", losses=3),
    Event.KILL_UNLOCKED: dict(symbol="BTC/USDT", reason="reviewed the journal"),
    Event.EMERGENCY_EXIT: dict(symbol="ETH/USDT", amount=0.5, reason="stop rejected", price=3000),
    Event.STOP_FAILED: dict(symbol="ETH/USDT", client_order_id="cb-stop-7", reason="-2010 insufficient balance"),
    Event.RECONCILE_MISMATCH: dict(symbol="BTC/USDT", summary="exchange holds 0.02 BTC, journal 0.01"),
    Event.STOP_MISMATCH: dict(symbol="BTC/USDT", summary="stop BTC/USDT: stopPrice 101 != planned 46896"),
    Event.FINGERPRINT_REFUSED: dict(model_id="m-2026", expected="a" * 64, actual="b" * 64, symbol="BTC/USDT"),
    Event.STALE_DATA: dict(symbol="BTC/USDT", age_s=1800, limit_s=600, last_candle="2026-11-28 22:00"),
    Event.DATA_RECOVERED: dict(symbol="BTC/USDT", stale_s=5400, last_candle="2026-11-28 23:00"),
    Event.START_REFUSED: dict(symbol="BTC/USDT", reason="model m-2026 is stale: its training data end 2026-09-01"),
    Event.AUDIT_VERDICT: dict(verdict="FAIL", blockers=["paper days 3 < 14"], summary="score 41", day="2026-11-28"),
    Event.DAILY_SUMMARY: dict(day="2026-11-28", pnl=12.5, trades=4, open_positions={"BTC/USDT": 0.01}, equity=1012.5,
                              kill_switch="off (0 consecutive loss(es))"),
}


def test_every_event_kind_reaches_the_receiver(receiver):
    assert set(FACTS) == set(Event)
    with Notifier.from_urls([receiver.url("/ok/hook")]) as n:
        for kind, facts in FACTS.items():
            assert n.notify(kind, **facts)
        assert n.flush(20)
    assert [p for p, _ in receiver.got] == ["/ok/hook"] * len(Event)
    for (_, body), (kind, facts) in zip(receiver.got, FACTS.items()):
        want = format_alert(kind, **facts)
        assert body["title"] == f"cryptobot: {want.title}"
        assert body["message"] == want.body
        assert body["type"] == want.level
    titles = [b["title"] for _, b in receiver.got]
    assert titles[0] == "cryptobot: Kill switch LOCKED (BTC/USDT)" and titles[-1] == "cryptobot: Daily summary 2026-11-28"
    assert n.stats["sent"] == len(Event) and n.stats["failed"] == 0


@pytest.mark.exclusive          # times the code: no other test runs meanwhile (conftest.py)
def test_hanging_receiver_does_not_block_notify_and_is_journaled(receiver, journal):
    n = Notifier.from_urls([receiver.url("/hang/hook")], on_failure=journal.log_event, timeout_s=0.5, attempts=2,
                           backoff_s=0.05)
    t0 = time.monotonic()
    results = [n.notify("kill_locked", symbol=f"S{i}/USDT", reason="3 losses") for i in range(5)]
    enqueue_s = time.monotonic() - t0
    assert results == [True] * 5 and enqueue_s < 0.5
    # returned at once: nothing has been sent or failed yet, the alerts wait in the queue (one may be in flight)
    assert n.stats["failed"] == 0 and n.stats["pending"] >= 4 and events(journal, "notify_failed") == []
    assert n.flush(30)
    failed = events(journal, "notify_failed")
    assert len(failed) == 5 and n.stats["failed"] == 5
    assert failed[0]["data"]["target"] == f"json://127.0.0.1:****" and failed[0]["data"]["attempts"] == 2
    assert "Kill switch LOCKED (S0/USDT)" in failed[0]["message"] and "after 2 attempt(s)" in failed[0]["message"]
    assert sum(p == "/hang/hook" for p, _ in receiver.got) == 10     # every attempt reached the receiver, then timed out
    n.close(5)


def test_refused_connection_is_retried_then_journaled(journal):
    n = Notifier.from_urls([f"json://127.0.0.1:{closed_port()}/hook"], on_failure=journal.log_event, attempts=3,
                           backoff_s=0.01)
    assert n.notify("stop_failed", symbol="BTC/USDT", client_order_id="cb-1", reason="rejected")
    assert n.flush(20)
    (ev,) = events(journal, "notify_failed")
    assert ev["data"]["attempts"] == 3 and ev["data"]["alert"] == "stop_failed"
    assert "connection error" in ev["data"]["error"].lower()
    n.close(5)


def test_failed_attempts_are_retried_until_delivered(receiver, journal):
    n = Notifier.from_urls([receiver.url("/flaky/2/hook")], on_failure=journal.log_event, attempts=3, backoff_s=0.01)
    assert n.notify("emergency_exit", symbol="BTC/USDT", amount=0.01, reason="stop rejected")
    assert n.flush(20)
    assert len(receiver.got) == 3 and n.stats["sent"] == 1 and events(journal, "notify_failed") == []
    n.close(5)


def test_one_dead_target_neither_hides_nor_duplicates_the_other(receiver, journal):
    n = Notifier.from_urls([receiver.url("/ok/a"), f"json://127.0.0.1:{closed_port()}/b"],
                           on_failure=journal.log_event, attempts=3, backoff_s=0.01)
    n.notify("reconcile_mismatch", symbol="BTC/USDT", summary="0.02 vs 0.01")
    assert n.flush(20)
    assert [p for p, _ in receiver.got] == ["/ok/a"] and len(events(journal, "notify_failed")) == 1
    n.close(5)


def test_identical_alerts_are_rate_limited(receiver):
    t = [1000.0]
    n = Notifier.from_urls([receiver.url("/ok/hook")], clock=lambda: t[0], window_s=600)
    for age in (700, 760, 820, 880):
        n.notify("stale_data", symbol="BTC/USDT", age_s=age, limit_s=600)
    n.notify("stale_data", symbol="ETH/USDT", age_s=700, limit_s=600)          # another title: its own key
    t[0] += 599
    n.notify("stale_data", symbol="BTC/USDT", age_s=1500, limit_s=600)        # still inside the window
    assert n.flush(20)
    assert [b["title"] for _, b in receiver.got] == ["cryptobot: Stale data BTC/USDT", "cryptobot: Stale data ETH/USDT"]
    assert n.stats["suppressed"] == 4
    t[0] += 2
    n.notify("stale_data", symbol="BTC/USDT", age_s=1700, limit_s=600)
    assert n.flush(20)
    assert len(receiver.got) == 3
    assert receiver.got[-1][1]["message"].endswith("(4 identical alert(s) held back since the last one)")
    n.close(5)


def test_full_queue_drops_oldest_non_urgent_and_journals_it(receiver, journal):
    n = Notifier.from_urls([receiver.url("/ok/hook")], on_failure=journal.log_event, maxsize=3, start=False)
    n.notify("kill_locked", symbol="BTC/USDT", reason="x")
    n.notify("daily_summary", day="d1", pnl=1, trades=1)
    n.notify("daily_summary", day="d2", pnl=1, trades=1)
    n.notify("stop_failed", symbol="BTC/USDT", client_order_id="c", reason="y")   # full: d1 goes, not the older lock
    n.start()
    assert n.flush(20)
    titles = [b["title"] for _, b in receiver.got]
    assert titles == ["cryptobot: Kill switch LOCKED (BTC/USDT)", "cryptobot: Daily summary d2",
                      "cryptobot: Stop not in place: BTC/USDT"]
    assert "1 older alert(s) dropped" in receiver.got[0][1]["message"]
    assert events(journal, "notify_dropped")[0]["data"] == {"dropped": 1}
    n.close(5)


def test_a_failing_failure_callback_does_not_stop_the_sender(receiver):
    def broken(*a):
        raise RuntimeError("journal closed")
    n = Notifier.from_urls([f"json://127.0.0.1:{closed_port()}/x"], on_failure=broken, attempts=1)
    n.notify("kill_locked", reason="a")
    assert n.flush(20)
    good = Notifier.from_urls([receiver.url("/ok/hook")], on_failure=broken)
    assert n._thread.is_alive()
    good.notify("kill_locked", reason="b")
    assert good.flush(20) and len(receiver.got) == 1
    n.close(5), good.close(5)


def test_close_is_bounded_and_records_what_was_not_sent(receiver, journal):
    n = Notifier.from_urls([receiver.url("/hang/hook")], on_failure=journal.log_event, timeout_s=5, attempts=3,
                           backoff_s=5)
    n.notify("kill_locked", reason="a")
    n.notify("kill_locked", symbol="ETH/USDT", reason="b")
    assert n.close(0.2) is False
    assert events(journal, "notify_unsent")[0]["data"] == {"unsent": 1}
    assert n.notify("kill_locked", reason="after close") is False


def test_no_url_secret_in_journal_logs_reprs_or_errors(receiver, journal, caplog):
    ok = f"json://alice:Pa55wordOK@127.0.0.1:{receiver.port}/ok/T0KENok"
    bad = f"json://bob:Hunter2Bad@127.0.0.1:{closed_port()}/x/T0KENbad"
    secrets = ["Pa55wordOK", "T0KENok", "Hunter2Bad", "T0KENbad", "S3cretTG"]
    caplog.set_level(logging.DEBUG)
    n = Notifier.from_urls([ok, bad], on_failure=journal.log_event, attempts=2, backoff_s=0.01)
    n.notify("kill_locked", symbol="BTC/USDT", reason="3 losses")
    assert n.flush(20)
    with pytest.raises(NotifyError) as e:
        Notifier.from_urls(["nosuchscheme://S3cretTG/123"])
    assert "nosuchscheme://****" in str(e.value)
    assert receiver.got and receiver.got[0][0] == "/ok/T0KENok"                   # the secrets were really used
    assert "JSON POST URL" in caplog.text and "****" in caplog.text                 # apprise did log the URL, scrubbed
    rows = journal.last_events(1000)
    assert [r["kind"] for r in rows] == ["notify_failed"]
    texts = {"journal": json.dumps(rows), "logs": caplog.text, "repr": repr(n), "error": str(e.value),
             "stats": str(n.stats), "targets": str(n.targets)}
    for where, text in texts.items():
        for s in secrets:
            assert s not in text, f"{s} in {where}"
    n.close(5)


def test_from_env_splits_the_setting_and_empty_means_disabled(receiver):
    n = Notifier.from_env({"CRYPTOBOT_NOTIFY_URLS": f" {receiver.url('/ok/a')} , {receiver.url('/ok/b')} "})
    assert n.targets == ["json://127.0.0.1:****"] * 2
    n.notify("kill_unlocked", reason="x")
    assert n.flush(20) and sorted(p for p, _ in receiver.got) == ["/ok/a", "/ok/b"]
    n.close(5)
    off = Notifier.from_env({"CRYPTOBOT_NOTIFY_URLS": ""})
    assert not off.enabled and off.notify("kill_locked", reason="x") is False and off.close(1)


def test_import_is_cheap_and_apprise_is_lazy():
    code = ("import sys, cryptobot.notify as m; a = [x for x in ('apprise', 'requests', 'vectorbt', 'sklearn', 'dask', "
            "'IPython', 'pandas', 'numpy') if x in sys.modules]; m.Notifier.from_env({}); "
            "b = 'apprise' in sys.modules; m.Notifier.from_urls(['json://127.0.0.1:9/x'], start=False); "
            "print(a, b, 'apprise' in sys.modules, [x for x in ('vectorbt', 'sklearn', 'dask', 'IPython') if x in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[] False True []"


def _in_flight(receiver, path, wall_s=30.0):
    "Wait (bounded) until the receiver holds a post to `path`: the sender thread is inside its attempt."
    t0 = time.monotonic()
    while not any(p == path for p, _ in receiver.got):
        assert time.monotonic() - t0 < wall_s, f"no post to {path}"
        time.sleep(0.01)


def test_close_waits_for_the_attempt_in_flight_and_never_calls_a_closed_journal(receiver, tmp_path, caplog):
    "Issue 18 case 9: `close` lets the attempt in flight end (bounded) so its failure is journaled before the journal "
    "closes; one that outlives even that bound is logged in one line (count, kind) and never reaches the closed journal."
    caplog.set_level(logging.WARNING)
    j = Journal(tmp_path / "a.sqlite")
    n = Notifier.from_urls([receiver.url("/hang/a")], on_failure=j.log_event, timeout_s=2, attempts=1)
    n.notify("kill_locked", symbol="BTC/USDT", reason="3 losses")
    _in_flight(receiver, "/hang/a")
    assert n.close(0.05) is True                       # returned only once the failure was recorded
    (failed,) = events(j, "notify_failed")
    assert failed["data"]["alert"] == "kill_locked"
    j.close()
    j2 = Journal(tmp_path / "b.sqlite")
    n2 = Notifier.from_urls([receiver.url("/hang/b")], on_failure=j2.log_event, timeout_s=3, attempts=1)
    n2.notify("stop_failed", symbol="ETH/USDT", client_order_id="cbs-1", reason="rejected")
    _in_flight(receiver, "/hang/b")
    assert n2.close(0.05, grace=0.05) is False         # the attempt outlives the bound
    j2.close()
    n2._thread.join(20)                                # ...and ends after the journal closed
    assert not n2._thread.is_alive()
    assert "could not record" not in caplog.text and "ProgrammingError" not in caplog.text
    assert "Traceback" not in caplog.text
    late = [r.getMessage() for r in caplog.records if "at shutdown" in r.getMessage()]
    assert late == ["notify: 1 alert (stop_failed) to 1 target(s) still being sent at shutdown; its outcome is not "
                    "journaled"]
