"""cryptobot.live: lean import, start-up refusals (exit codes), the live gate against the emulator's balance, redacted
structured logs, the accelerated-clock loop, parity catching a forming candle."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import threading

import pandas as pd
import pytest

from cryptobot.config import Settings
from cryptobot.emulator import Emulator
from cryptobot.live import EX_CONFIG, EX_UNAVAILABLE, live_gate_blockers, run, setup_logging
from cryptobot.parity import parity, replay

KEY, SECRET = "live-key-93ab1", "live-secret-Qp02xx"


def test_import_is_lean():
    code = ("import sys, cryptobot.live; print(','.join(m for m in ('vectorbt', 'numba', 'papermill', 'IPython', "
            "'jupyter_client', 'plotly', 'matplotlib', 'sklearn', 'cryptobot.backtest', 'cryptobot.model', "
            "'cryptobot.emulator', 'aiohttp') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing cryptobot.live pulled in {out}"


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    from cryptobot import data as D, model as M
    c = D.synthetic_candles(n=2_200, seed=9)
    res = M.train_walk_forward(c.iloc[:1_900], n_folds=2, params={"max_iter": 20})
    d = tmp_path_factory.mktemp("models")
    return c, res.save(d), d


@pytest.fixture
def emu(market):
    e = Emulator(market[0], clock="stepped", start=2_000, api_key=KEY, api_secret=SECRET, balances={"USDT": 60.0})
    e.start()
    yield e
    e.stop()


def _run(settings, model, **kw):
    buf = io.StringIO()
    setup_logging(settings, stream=buf)
    rc = run(settings, model=model, logs=False, max_model_age_days=None, settle_s=0, poll_s=0.01, min_poll_s=0.01,
             rate_limit_ms=1.0, executor_kw={"settle_s": 0.0, "sleep": lambda _s: None}, **kw)
    return rc, buf.getvalue()


def test_refuses_a_model_from_other_feature_code(market, emu, tmp_path):
    c, path, _ = market
    m = json.loads((path / "manifest.json").read_text())
    bad = tmp_path / "badmodel"
    bad.mkdir()
    for f in path.iterdir():                      # the same artifact, files and all, but another fingerprint
        if f.name != "manifest.json":
            (bad / f.name).write_bytes(f.read_bytes())
    (bad / "manifest.json").write_text(json.dumps({**m, "feature_fingerprint": "0" * 64}))
    s = Settings(state_dir=tmp_path / "st", exchange_url=emu.base_url, api_key=KEY, api_secret=SECRET)
    rc, out = _run(s, bad, max_candles=1)
    assert rc == EX_CONFIG
    line = [l for l in out.splitlines() if "startup_refused" in l]
    assert len(line) == 1 and "fingerprint" in line[0] and "retrain" in line[0]
    assert not (tmp_path / "st" / "journal.sqlite").exists() or emu.orders_created == 0


def test_refuses_a_stale_or_absent_model(market, emu, tmp_path):
    s = Settings(state_dir=tmp_path / "st", data_dir=tmp_path / "nodata", exchange_url=emu.base_url)
    rc, out = _run(s, None, max_candles=1)
    assert rc == EX_CONFIG and "no model artifact" in out
    buf = io.StringIO()
    setup_logging(s, stream=buf)
    rc = run(s, model=market[1], logs=False, max_model_age_days=1.0, rate_limit_ms=1.0)   # trained ~4 days before
    assert rc == EX_CONFIG and "stale" in buf.getvalue()


def test_mode_and_live_gate(market, emu, tmp_path):
    s = Settings(state_dir=tmp_path / "st", exchange_url=emu.base_url)
    rc, out = _run(s, market[1], mode="live", max_candles=1)
    assert rc == EX_CONFIG and "GO_LIVE" in out
    assert live_gate_blockers(Settings(go_live=True, api_key=KEY, api_secret=SECRET), 60.0)[0].startswith(
        "free USDT balance 60.00 is below the floor")


def test_live_gate_asks_the_exchange_balance(market, emu, tmp_path):
    "GO_LIVE with keys, but the account holds 60 USDT (< the 100 floor): refused before any order, exit 78."
    s = Settings(state_dir=tmp_path / "st", exchange_url=emu.base_url, go_live=True, api_key=KEY, api_secret=SECRET)
    rc, out = _run(s, market[1], mode="live", max_candles=1)
    assert rc == EX_CONFIG and "balance 60.00 is below the floor 100.00" in out
    assert emu.orders_created == 0 and KEY not in out and SECRET not in out
    # enough balance, but the (future) readiness audit says no: the hook blocks too
    emu._book.free["USDT"] += emu._book.free["USDT"].__class__(1000)
    rc, out = _run(s, market[1], mode="live", max_candles=1, audit=lambda st: ["readiness audit score 4/10 < 8"])
    assert rc == EX_CONFIG and "readiness audit score 4/10" in out and "below the floor" not in out
    assert emu.orders_created == 0


def test_unreachable_exchange_exits_69(market, tmp_path):
    s = Settings(state_dir=tmp_path / "st", exchange_url="http://127.0.0.1:9")
    rc, out = _run(s, market[1], max_candles=1, retry={"retries": 0})
    assert rc == EX_UNAVAILABLE and "unreachable" in out


def test_runs_on_the_accelerated_clock_and_logs_redacted(market, tmp_path):
    "The real-time loop (wait by the exchange clock, step) on an accelerated emulator; secrets never in the log."
    c, path, _ = market
    e = Emulator(c, clock="accelerated", speed=3600 * 10, start=2_050, api_key=KEY, api_secret=SECRET)
    e.start()
    try:
        s = Settings(state_dir=tmp_path / "st", exchange_url=e.base_url, api_key=KEY, api_secret=SECRET,
                     max_data_age_s=3600)
        rc, out = _run(s, path, max_candles=5)
    finally:
        e.stop()
    assert rc == 0
    lines = out.splitlines()
    assert sum("event=candle " in l for l in lines) == 5
    assert all(l.startswith("ts=") and " event=" in l for l in lines), lines[:3]
    assert KEY not in out and SECRET not in out and "signature=" not in out.replace("signature=****", "")
    rep = parity(s, candles=c)
    assert rep.ok and rep.compared == 5


def test_sigterm_in_a_subprocess_exits_0_and_keeps_the_stop(market, tmp_path):
    "A runner with an open position gets SIGTERM: it finishes, exits 0, the stop stays on the exchange."
    import signal, time, os
    c, path, _ = market
    e = Emulator(c, clock="stepped", start=2_050, api_key=KEY, api_secret=SECRET)
    e.start()
    code = f"""
import sys
from cryptobot.config import Settings
from cryptobot.live import run
from cryptobot.model import ThresholdPolicy
s = Settings(state_dir={str(tmp_path / 'st')!r}, exchange_url={e.base_url!r}, api_key={KEY!r}, api_secret={SECRET!r})
sys.exit(run(s, model={str(path)!r}, strategy=ThresholdPolicy(0.0, 0.0, 1000), max_model_age_days=None, settle_s=0,
             poll_s=0.02, min_poll_s=0.01, rate_limit_ms=1.0, executor_kw={{"settle_s": 0.0}}))
"""
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        end = time.time() + 60
        while not any(o["type"] == "STOP_LOSS_LIMIT" and o["status"] == "NEW" for o in e.orders):
            assert time.time() < end and p.poll() is None, p.stdout.read() if p.poll() is not None else "timeout"
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=30)
        assert p.returncode == 0, out[-2000:]
        assert "event=shutdown" in out and "event=signal name=SIGTERM" in out
        assert [o for o in e.orders if o["type"] == "STOP_LOSS_LIMIT" and o["status"] == "NEW"], "stop was cancelled"
    finally:
        if p.poll() is None:
            p.kill()
        e.stop()
