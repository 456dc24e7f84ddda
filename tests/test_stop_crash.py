"""The SIGKILL soak with stop checks running (issue 14): runners killed at the stop watch's fault point (right before a
check), at order fault points, and by SIGKILL at random moments while the clock moves inside a candle (so checks are
running), restarted each time; afterwards the crash test's invariants hold (no duplicate order, no lost fill, every
open position has its stop, state.json = the journal). Reuses test_live_crash's fork server and invariant check."""
from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import time

import pandas as pd
import pytest

from test_live_crash import KEY, SECRET, ForkServer, check_invariants, done_candles, market  # noqa: F401 - fixture


def _checks(journal) -> int:
    if not journal.exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=1)
        try:
            return con.execute("SELECT COUNT(*) FROM events WHERE kind = 'stop_check'").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def test_sigkill_during_stop_checks(market, tmp_path):
    from cryptobot.emulator import Emulator
    c, model = market
    rng = random.Random(14)
    emu = Emulator(c, clock="stepped", start=2_700, api_key=KEY, api_secret=SECRET, balances={"USDT": 10_000})
    emu.start()
    fs = ForkServer(tmp_path)
    state = tmp_path / "state"
    journal = state / "journal.sqlite"
    base = dict(state=str(state), url=emu.base_url, key=KEY, secret=SECRET, model=model,
                log=str(tmp_path / "runner.log"))
    stats = {"kills": 0, "check_point_kills": 0, "timed_kills_in_checks": 0, "bars": 0, "checks": 0}
    pid, t0 = None, time.time()
    try:
        while stats["bars"] < 30 or stats["kills"] < 12:
            assert time.time() - t0 < 240, f"over budget: {stats}"
            if pid is None:
                spec = rng.choice(["check:1", "check:2", "check:3", "send:1", "cancel:1", None, None])
                pid = fs.spawn({**base, "crash": spec})
            close = round(emu.now.floor("1h").timestamp())          # the last candle close (the clock may be mid-bar)
            while pid is not None and close not in done_candles(journal):
                if not fs.alive(pid):
                    assert fs.exits[pid] == -signal.SIGKILL, (tmp_path / "runner.log").read_text()[-3000:]
                    stats["kills"] += 1
                    stats["check_point_kills"] += "check" in (spec or "")
                    pid = None
                time.sleep(0.005)
            if pid is None:
                continue
            for _ in range(3):                            # inside the candle: a stop check every 60 s of market time
                n0 = _checks(journal)
                emu.set_time(emu.now + pd.Timedelta(seconds=61))
                if spec is None and stats["kills"] < 12 and rng.random() < 0.3:
                    time.sleep(rng.uniform(0.0, 0.03))    # kill while the check is (likely) running
                    if fs.alive(pid):
                        os.kill(pid, signal.SIGKILL)
                        assert fs.wait(pid) == -signal.SIGKILL
                        stats["kills"] += 1
                        stats["timed_kills_in_checks"] += 1
                        pid = None
                        break
                end = time.time() + 0.5
                while fs.alive(pid) and _checks(journal) == n0 and time.time() < end:
                    time.sleep(0.005)
                if not fs.alive(pid):
                    stats["kills"] += 1
                    stats["check_point_kills"] += "check" in (spec or "")
                    pid = None
                    break
            if pid is None:
                continue
            emu.advance(1)
            stats["bars"] += 1
        if pid is None:
            pid = fs.spawn({**base, "crash": None})
        close = round(emu.now.floor("1h").timestamp())
        end = time.time() + 30
        while close not in done_candles(journal):
            assert time.time() < end and fs.alive(pid), (tmp_path / "runner.log").read_text()[-3000:]
            time.sleep(0.01)
        time.sleep(0.3)                                   # its SIGTERM handler is installed by now
        os.kill(pid, signal.SIGTERM)
        assert fs.wait(pid) == 0
        stats["checks"] = _checks(journal)
        log = (tmp_path / "runner.log").read_text()
        stats["check_point_hits"] = log.count("point=check ")
        problems = check_invariants(emu, state)
    finally:
        if pid is not None and fs.alive(pid):
            os.kill(pid, signal.SIGKILL)
        fs.close()
        emu.stop()
    print(json.dumps(stats))
    assert problems == [], problems
    assert stats["kills"] >= 12 and stats["check_point_hits"] >= 3, stats
    assert stats["checks"] >= 20, f"too few stop checks ran to mean anything: {stats}"
