"""`cryptobot status` and the dashboard measure the candle's age on the runner's clock: during a replay on the emulator
that is the emulator's market clock, not the wall's; and the order queue's routine `job_queued` lines stay at DEBUG."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from cryptobot.config import Settings
from cryptobot.emulator import Emulator
from cryptobot.guardian import JOURNAL_FILE, Guardian
from cryptobot.journal import Journal

CRYPTOBOT = str(Path(sys.executable).parent / "cryptobot")


def _replayed_state(tmp_path):
    "An emulator replaying 2020 candles, and a state dir whose runner processed the last closed candle 5 s ago."
    from cryptobot.data import synthetic_candles
    emu = Emulator(synthetic_candles(n=1_300, seed=4), clock="stepped", start=1_100).start()
    close = emu.now.timestamp()
    s = Settings(state_dir=tmp_path / "st", exchange_url=emu.base_url)
    s.state_dir.mkdir()
    with Journal(s.state_dir / JOURNAL_FILE, clock=lambda: close + 5) as j:
        Guardian(s, s.state_dir, j, clock=lambda: close + 5).note_candle(close, 10_000.0)
    return emu, s


def test_cli_status_ages_the_candle_on_the_emulators_clock(tmp_path):
    emu, s = _replayed_state(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CRYPTOBOT_", "BINANCE_", "GO_LIVE"))}
    url = emu.base_url
    env.update(CRYPTOBOT_STATE_DIR=str(s.state_dir), CRYPTOBOT_EXCHANGE_URL=url)
    try:
        js = subprocess.run([CRYPTOBOT, "status", "--json"], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
        txt = subprocess.run([CRYPTOBOT, "status"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    finally:
        emu.stop()
    assert js.returncode == 0 and txt.returncode == 0, js.stderr + txt.stderr
    rep = json.loads(js.stdout)
    assert 0 <= rep["last_candle_age_s"] < 3_600, rep["last_candle_age_s"]      # the wall clock says ~2e8 s
    assert rep["clock"] == f"exchange {url}", rep["clock"]
    assert f"clock      exchange {url}" in txt.stdout, txt.stdout


def test_the_dashboard_snapshot_ages_the_candle_on_the_emulators_clock(tmp_path):
    from cryptobot.monitor import snapshot
    emu, s = _replayed_state(tmp_path)
    try:
        snap = snapshot(s)
    finally:
        emu.stop()
    assert 0 <= snap["status"]["last_candle_age_s"] < 3_600, snap["status"]["last_candle_age_s"]
    assert snap["freshness"]["level"] != "stale", snap["freshness"]


def test_status_without_an_emulator_answering_falls_back_to_the_wall_clock_and_says_so(tmp_path):
    from cryptobot.monitor import exchange_now
    now, clock = exchange_now(Settings(state_dir=tmp_path, exchange_url="http://127.0.0.1:9"))
    assert clock.startswith("wall (the exchange at http://127.0.0.1:9 did not answer") and now > 1.7e9


def test_job_queued_lines_are_debug_not_info(caplog):
    "A routine stop check queued every few seconds (`_ex_sync`) is not an INFO line; its outcome is logged anyway."
    from cryptobot.exchange import OrderQueue

    def _ex_sync():
        return "protected"
    with OrderQueue() as q:
        with caplog.at_level(logging.INFO, logger="cryptobot.exchange"):
            assert q.submit("BTC/USDT", _ex_sync).result(10) == "protected"
        assert not [r for r in caplog.records if "job_queued" in r.getMessage()]
        with caplog.at_level(logging.DEBUG, logger="cryptobot.exchange"):
            q.submit("BTC/USDT", _ex_sync).result(10)
        assert [r.levelno for r in caplog.records if "job_queued" in r.getMessage()] == [logging.DEBUG]
