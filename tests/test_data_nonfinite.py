"""Issue 9 item 1: a non-finite candle value (inf, -inf, a CSV's 1e400, NaN from the exchange) is refused wherever
candles enter besides import and download (tests/test_data*.py): the emulator's data and the live runner's poll.
Real parts: the emulator on 127.0.0.1, the real ccxt client, the real runner and journal."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cryptobot import data as D
from cryptobot.config import Settings
from cryptobot.data import CandleDataError
from cryptobot.emulator import Emulator, EmulatorError, load_market

CRYPTOBOT = str(Path(sys.executable).parent / "cryptobot")
KEY, SECRET = "nonfinite-key-1", "nonfinite-secret-2"
ROWS = "".join(f"2024-03-01 {h:02d}:00:00,100,101,99,100.5,5\n" for h in range(5))


def _inf_csv(tmp_path) -> Path:
    p = tmp_path / "inf.csv"
    p.write_text("timestamp,open,high,low,close,volume\n" + ROWS + "2024-03-01 05:00:00,1e400,1e400,99,1e400,5\n")
    return p


# ------------------------------------------------------------------ the emulator's data
def test_emulator_refuses_a_file_with_inf(tmp_path):
    with pytest.raises(CandleDataError, match=r"non-finite value\(s\) \(first 2024-03-01 05:00 UTC: open=inf\)"):
        load_market(_inf_csv(tmp_path))                         # the file path goes through data.load_candles


@pytest.mark.parametrize("col", ["open", "high", "close", "volume"])
def test_emulator_refuses_a_frame_with_inf(col):
    c = D.synthetic_candles(n=50, seed=3)
    c.loc[c.index[-1], col] = np.inf
    with pytest.raises(EmulatorError, match="NaN or infinite"):
        Emulator(c, clock="stepped", start=10)
    c.loc[c.index[-1], col] = np.nan
    with pytest.raises(EmulatorError, match="NaN or infinite"):
        Emulator(c, clock="stepped", start=10)


def test_cryptobot_emulator_with_an_inf_file_exits_with_one_line(tmp_path):
    r = subprocess.run([CRYPTOBOT, "emulator", "--data", str(_inf_csv(tmp_path)), "--port", "0"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith("cryptobot emulator: ") and "non-finite" in r.stderr and "inf.csv" in r.stderr


# ------------------------------------------------------------------ the runner's poll
@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from cryptobot import model as M
    c = D.synthetic_candles(n=2_200, seed=9)
    res = M.train_walk_forward(c.iloc[:1_900], n_folds=2, params={"max_iter": 20})
    return c, res.save(tmp_path_factory.mktemp("models"))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")     # the emulator draws the forming bar's path from the inf
@pytest.mark.parametrize("fills,forming", [("exchange", False), ("paper", False), ("paper", True)])
def test_runner_skips_a_polled_inf_candle_without_trading_or_crashing(model, tmp_path, fills, forming):
    "An inf candle (or, with `forming`, an inf open of the forming candle first): no decision, no order, no crash."
    from cryptobot.live import start_runner
    from cryptobot.model import ThresholdPolicy
    candles, path = model
    emu = Emulator(candles, clock="stepped", start=2_000, api_key=KEY, api_secret=SECRET, balances={"USDT": 10_000.0})
    emu.start()
    s = dataclasses.replace(Settings(), state_dir=tmp_path / "var", exchange_url=emu.base_url,
                            api_key=KEY if fills == "exchange" else None,
                            api_secret=SECRET if fills == "exchange" else None)
    always = ThresholdPolicy(entry_threshold=0.0, exit_threshold=0.0, max_hold=10_000)      # enters on every usable bar
    runner = start_runner(s, "paper", path, fills=fills, strategy=always, settle_s=0, poll_s=0.01, min_poll_s=0.01,
                          max_model_age_days=None, executor_kw={"settle_s": 0.0, "sleep": lambda _s: None},
                          rate_limit_ms=1.0)
    try:
        tape = next(iter(emu.tapes.values()))
        i = emu.bar + forming                                    # closes as inf at the first (or second) step
        tape.set_bar(i, np.inf, np.inf, tape.l[i], np.inf, tape.v[i])
        ticks = []
        for _ in range(3):                                       # the bad candle, then two with it in the window
            emu.advance(1)
            ticks.append(runner.step())
        assert (ticks[0].close == np.inf) is not forming and ticks[int(forming)].close == np.inf
        assert [(t.action, t.outcome, t.proba) for t in ticks] == [("skip", "bad_data", None)] * 3
        assert runner.executor.position() is None and emu.orders_created == 0 and len(emu.trades) == 0
        errors = runner.journal.select("SELECT kind, message FROM poll_errors")
        assert len(errors) == 3 and all(e["kind"] == "data" for e in errors)
        first = errors[0]["message"]
        assert "\n" not in first and "no trade" in first, first
        assert ("the forming candle opens at inf" if forming else "non-finite value(s)") in first, first
        assert "open=inf" in errors[-1]["message"]
        done = runner.journal.last_events(1, kind="candle_done")[0]
        assert done["data"]["action"] == "skip" and done["data"]["outcome"] == "bad_data"
    finally:
        runner.queue.close(wait=True)
        runner.journal.close()
        emu.stop()
