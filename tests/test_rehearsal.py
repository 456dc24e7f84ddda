"""A rehearsal at the defaults (issue 9, item 9): `cryptobot emulator` and `cryptobot run` as two processes on
loopback, the runner pointed at the emulator by CRYPTOBOT_EXCHANGE_URL. Every candle after the first is processed, in
order, none skipped, and no entry is denied as stale, at the emulator's default speed and at a slower one."""
from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

CLI = str(Path(sys.executable).parent / "cryptobot")


@pytest.fixture(scope="module")
def lax_model(tmp_path_factory):
    "A small model on the emulator's synthetic market, its strategy set to enter on every flat candle."
    from cryptobot import data as D, model as M
    c = D.synthetic_candles(n=1_000)                 # the emulator's default market starts at bar 1000 of it
    path = M.train_walk_forward(c, n_folds=2, params={"max_iter": 20}).save(tmp_path_factory.mktemp("models"))
    m = json.loads((path / "manifest.json").read_text())
    m["strategy"] = {"entry_threshold": 0.0, "exit_threshold": 0.0, "max_hold": 1}
    (path / "manifest.json").write_text(json.dumps(m))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rehearse(tmp: Path, model: Path, speed: float | None, n_candles: int, stop_market: bool = False):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CRYPTOBOT_", "BINANCE_", "GO_LIVE"))}
    args = [CLI, "emulator", "--port", str(port)] + ([] if speed is None else ["--speed", str(speed)])
    args += ["--stop-market"] if stop_market else []
    emu = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp)
    try:
        line = emu.stdout.readline()
        assert "emulator ready" in line, line
        renv = dict(env, CRYPTOBOT_EXCHANGE_URL=f"http://127.0.0.1:{port}", BINANCE_API_KEY="emulator-key",
                    BINANCE_API_SECRET="emulator-secret", CRYPTOBOT_STATE_DIR=str(tmp / "state"),
                    CRYPTOBOT_KILL_SWITCH_LOSSES="10")          # the test counts entries, not losses
        run = subprocess.run([CLI, "run", "--model", str(model), "--max-candles", str(n_candles)], env=renv,
                             cwd=tmp, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    finally:
        emu.terminate()
        emu.wait(30)
    con = sqlite3.connect(f"file:{tmp / 'state' / 'journal.sqlite'}?mode=ro", uri=True)
    try:
        done = [json.loads(d) for (d,) in con.execute("SELECT data FROM events WHERE kind = 'candle_done' ORDER BY id")]
        denials = [json.loads(r) for (r,) in con.execute("SELECT reasons FROM decisions WHERE approved = 0")]
        approved = con.execute("SELECT COUNT(*) FROM decisions WHERE approved = 1").fetchone()[0]
        stops = {t for (t,) in con.execute("SELECT type FROM intents WHERE purpose = 'stop'")}
    finally:
        con.close()
    return done, denials, approved, stops


@pytest.mark.parametrize("speed", [None, 360.0], ids=["default-speed", "speed-360"])
def test_rehearsal_processes_every_candle_with_fresh_data(tmp_path, lax_model, speed):
    n = 16 if speed is None else 5
    done, denials, approved, stops = _rehearse(tmp_path, lax_model, speed, n, stop_market=speed is not None)
    times = [d["candle_time"] for d in done]
    assert len(times) == n
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps == [3600.0] * (n - 1), f"candles skipped: gaps {gaps}"        # every candle after the first, in order
    # the candles that closed while the runner started (1-2 at 3600x) are late; every one after them is fresh
    stale = [r for r in denials[2:] if any("stale" in x for x in r)]
    assert stale == [], stale
    assert approved >= (n - 2) // 2 - 1, denials                             # it traded: enter, exit, enter, ...
    assert stops == ({"stop_loss"} if speed is not None else {"stop_loss_limit"})   # emulator --stop-market
