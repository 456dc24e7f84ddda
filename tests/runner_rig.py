"""The runner test harness shared by the stop-watch and alert tests: a small trained model, an accelerated emulator
(real ccxt client over loopback, real SQLite) with the real runner loop in a thread, and read-only journal queries."""
from __future__ import annotations

import json
import sqlite3
import threading
import time

import pandas as pd
import pytest

from cryptobot.config import Settings
from cryptobot.emulator import ORDER_TYPES, ORDER_TYPES_STOP_MARKET, Emulator
from cryptobot.live import start_runner
from market import frame

KEY, SECRET = "rig-key-71c2", "rig-secret-Zx90qq"
SPEED = 360.0            # one 1h candle every 10 s of wall time; a 60 s check every 1/6 s


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from cryptobot import data as D, model as M
    c = D.synthetic_candles(n=1_200, seed=5)
    res = M.train_walk_forward(c, n_folds=2, params={"max_iter": 20})
    return res.save(tmp_path_factory.mktemp("models"))


def read_rows(state_dir, sql, args=()):
    "Rows from a journal through a read-only connection of the test's own (the runner keeps writing)."
    con = sqlite3.connect(f"file:{state_dir / 'journal.sqlite'}?mode=ro", uri=True, timeout=5)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(sql, args).fetchall()]
    finally:
        con.close()


class Rig:
    """An accelerated emulator (STOP_LOSS listed or not), an always-long runner (the real `run` loop) in a thread.
    `start`: the emulator's first exchange time; `settings`: extra `Settings` fields; `runner_kw`: to `start_runner`."""

    def __init__(self, tmp, model, *, stop_market: bool = True, start=None, settings: dict | None = None, df=None,
                 **runner_kw):
        self.df = frame(1_300) if df is None else df
        self.model, self.runner_kw = model, runner_kw
        start = self.df.index[1_100] + pd.Timedelta(minutes=40) if start is None else start
        self.emu = Emulator(self.df, clock="accelerated", speed=SPEED, start=start, api_key=KEY, api_secret=SECRET,
                            order_types=ORDER_TYPES_STOP_MARKET if stop_market else ORDER_TYPES)
        self.emu.start()
        self.s = Settings(state_dir=tmp / "st", exchange_url=self.emu.base_url, api_key=KEY, api_secret=SECRET,
                          **{"stop_check_s": 60, **(settings or {})})
        self.stop_event = threading.Event()
        try:
            self.runner = self.start_runner(model, **runner_kw)
        except BaseException:
            self.emu.stop()
            raise
        self.thread = threading.Thread(target=self.runner.run, daemon=True)
        self.thread.start()

    def start_runner(self, model, **runner_kw):
        from cryptobot.model import ThresholdPolicy
        return start_runner(self.s, "paper", model, **{"strategy": ThresholdPolicy(0.0, 0.0, 1000),
                                                       "stop_event": self.stop_event, "max_model_age_days": None,
                                                       "rate_limit_ms": 1.0, **runner_kw})

    def restart(self):
        "Stop the runner (as SIGTERM does) and start a new one on the same state dir and emulator."
        self.stop_event.set()
        self.thread.join(60)
        self.stop_event = threading.Event()
        self.runner = self.start_runner(self.model, **self.runner_kw)
        self.thread = threading.Thread(target=self.runner.run, daemon=True)
        self.thread.start()

    def close(self):
        self.stop_event.set()
        self.thread.join(60)
        self.emu.stop()

    def rows(self, sql, args=()):
        return read_rows(self.s.state_dir, sql, args)

    def events(self, kind=None):
        "(ts, kind, message, data) of the journal's events, oldest first (only `kind` if given)."
        sql = "SELECT ts, kind, message, data FROM events" + (" WHERE kind = ?" if kind else "") + " ORDER BY id"
        return [(r["ts"], r["kind"], r["message"], json.loads(r["data"]) if r["data"] else None)
                for r in self.rows(sql, (kind,) if kind else ())]

    def wait_for(self, cond, what: str, wall_s: float = 60.0):
        t0 = time.monotonic()
        while time.monotonic() - t0 < wall_s:
            v = cond()
            if v:
                return v
            time.sleep(0.01)
        raise AssertionError(f"timed out waiting for {what}; events: {self.events()[-15:]}")

    def stop_order(self):
        "The first stop the emulator accepted (after the entry), or None."
        st = [o for o in self.emu.orders if o["type"] in ("STOP_LOSS", "STOP_LOSS_LIMIT")]
        return st[0] if st else None

    def crash_next_bar(self, stop: dict):
        "Reshape the bar after the one the stop was placed in: a down bar whose path crosses the stop mid-candle."
        tape = next(iter(self.emu.tapes.values()))
        with self.emu._lock:
            i = tape.bar_at(stop["time"]) + 1
            o = float(tape.c[i - 1])
            low = stop["stop_price"] * 0.97
            tape.set_bar(i, o, o * 1.001, low, low * 1.003, 12.0)
        return i, int(tape.t[i]) / 1000.0

    def lose_once(self, lock: bool = True):
        "Entry, its stop; then the next bar falls through the stop: a losing trade (and, if `lock`, the kill switch)."
        self.crash_next_bar(self.wait_for(self.stop_order, "the stop after the entry", 90))
        if lock:
            self.wait_for(lambda: self.rows("SELECT * FROM locks"), "the kill switch", 90)

    def orders(self):
        return self.rows("SELECT client_order_id, side, type, amount, price, stop_price, purpose, candle_time "
                         "FROM intents ORDER BY id")
