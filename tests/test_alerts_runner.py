"""Alerts wired into the runner (issue 13): the real runner on the emulator (real ccxt client, real SQLite), apprise's
`json://` webhook against a real `http.server` receiver on 127.0.0.1. A dead receiver changes nothing about trading."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cryptobot.config import Secret, Settings
from cryptobot.emulator import Emulator
from cryptobot.live import EX_CONFIG, StartupRefused, setup_logging, start_runner
from market import frame
from runner_rig import KEY, SECRET, Rig as RunnerRig, model  # noqa: F401 - `model` is a fixture
from test_notify import closed_port, receiver  # noqa: F401 - `receiver` is a fixture

TOKEN = "tok3nS3CRETzz91"                  # the secret part of every alert URL below
CRYPTOBOT = str(Path(sys.executable).parent / "cryptobot")
FAST = dict(timeout_s=0.5, attempts=2, backoff_s=0.05)      # a dead receiver fails fast (bounded either way)


def Rig(tmp, model, url: str, stop_market: bool = True, settings: dict | None = None, **kw) -> RunnerRig:
    "The shared runner rig with alerts to `url` (kill switch after 1 loss unless `settings` say otherwise)."
    return RunnerRig(tmp, model, stop_market=stop_market, notify_kw=FAST,
                     settings={"kill_switch_losses": 1, "notify_urls": Secret(url), **(settings or {})}, **kw)


def _run_to_lock(tmp, model, url):
    r = Rig(tmp, model, url)
    try:
        r.lose_once()
        return r
    except BaseException:
        r.close()
        raise


def test_kill_switch_lock_reaches_the_receiver_and_the_secret_stays_out(receiver, model, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    r = _run_to_lock(tmp_path, model, receiver.url(f"/ok/{TOKEN}"))
    try:
        got = r.wait_for(lambda: [b for p, b in receiver.got if "LOCKED" in b["title"]], "the KILL_LOCKED alert", 30)
        from cryptobot.guardian import unlock_cli          # what `cryptobot unlock` does, from outside the runner
        assert unlock_cli(r.s, "reviewed the stop-out").startswith("unlocked")
        un = r.wait_for(lambda: [b for p, b in receiver.got if "unlocked" in b["title"]], "the KILL_UNLOCKED alert", 40)
    finally:
        r.close()
    assert un[0]["title"] == "cryptobot: Kill switch unlocked (BTC/USDT)" and "reviewed the stop-out" in un[0]["message"]
    assert got[0]["title"] == "cryptobot: Kill switch LOCKED (BTC/USDT)" and got[0]["type"] == "failure"
    assert "kill switch: 1 consecutive losing trades" in got[0]["message"]          # the reason, from the Guardian
    assert "Consecutive losses: 1." in got[0]["message"]
    assert len(got) == 1                                                            # once, not once per poll
    journal = json.dumps(r.rows("SELECT * FROM events")) + json.dumps(r.rows("SELECT * FROM intents"))
    assert TOKEN not in journal and TOKEN not in caplog.text
    assert "notify_failed" not in journal


def test_dead_or_hanging_receiver_trades_exactly_the_same_and_is_journaled(receiver, model, tmp_path):
    rigs = {}

    def go(name, url):
        rigs[name] = _run_to_lock(tmp_path / name, model, url)

    threads = [threading.Thread(target=go, args=a) for a in
               (("ok", receiver.url(f"/ok/{TOKEN}")), ("hang", receiver.url(f"/hang/{TOKEN}")),
                ("refused", f"json://127.0.0.1:{closed_port()}/{TOKEN}"))]
    [t.start() for t in threads]
    [t.join(150) for t in threads]
    try:
        assert set(rigs) == {"ok", "hang", "refused"}
        for name in ("hang", "refused"):
            failed = rigs[name].wait_for(lambda n=name: rigs[n].rows("SELECT * FROM events WHERE kind = 'notify_failed'"),
                                         f"notify_failed ({name})", 30)
            d = json.loads(failed[0]["data"])
            assert d["alert"] == "kill_locked" and d["target"] == "json://127.0.0.1:****" and d["attempts"] == 2
        want = rigs["ok"].orders()
        assert [o["purpose"] for o in want] == ["entry", "stop"]
        for name in ("hang", "refused"):
            assert rigs[name].orders() == want, name                  # same orders, same amounts and prices
            assert rigs[name].runner.guardian.locked
            text = json.dumps(rigs[name].rows("SELECT * FROM events"))
            assert TOKEN not in text
        assert not rigs["ok"].rows("SELECT * FROM events WHERE kind = 'notify_failed'")
    finally:
        for r in rigs.values():
            r.close()


def test_setup_logging_redacts_the_url_token():
    import io
    s = Settings(notify_urls=Secret(f"json://127.0.0.1:8080/hook/{TOKEN},tgram://123456789:AAH{TOKEN}/42"))
    buf = io.StringIO()
    setup_logging(s, stream=buf)
    logging.getLogger("cryptobot.live").warning("posting to json://127.0.0.1:8080/hook/%s failed", TOKEN)
    logging.getLogger("cryptobot.live").warning("tgram AAH%s", TOKEN)
    out = buf.getvalue()
    assert out.count("failed") == 1 and out.count("tgram") == 1 and TOKEN not in out


def test_invalid_url_is_a_settings_error_masked(tmp_path, model):
    s = Settings(state_dir=tmp_path / "st", notify_urls=Secret(f"nosuchscheme://user:{TOKEN}@example.com/x"))
    with pytest.raises(StartupRefused) as e:
        start_runner(s, "paper", model, max_model_age_days=None)
    assert e.value.exit_code == EX_CONFIG == 78
    assert "CRYPTOBOT_NOTIFY_URLS" in str(e.value) and "nosuchscheme://example.com:****" in str(e.value)
    assert TOKEN not in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "st").exists()                                   # refused before anything was written


def _cli(args, cwd, env):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("CRYPTOBOT_", "BINANCE_", "GO_LIVE"))}
    e.update(env)
    return subprocess.run([CRYPTOBOT, *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=120)


def test_cryptobot_config_shows_the_url_masked(tmp_path):
    env = {"CRYPTOBOT_NOTIFY_URLS": f"json://127.0.0.1:9/hook/{TOKEN}, tgram://123456789:AAH{TOKEN}/42"}
    r = _cli(["config"], tmp_path, env)
    assert r.returncode == 0, r.stderr
    assert "CRYPTOBOT_NOTIFY_URLS=json://127.0.0.1:****,tgram://****" in r.stdout.splitlines()
    r = _cli(["config", "--json"], tmp_path, env)
    assert json.loads(r.stdout)["notify_urls"] == "json://127.0.0.1:****,tgram://****"
    assert TOKEN not in r.stdout + r.stderr
    r = _cli(["config"], tmp_path, {})
    assert "CRYPTOBOT_NOTIFY_URLS=" in r.stdout.splitlines()                  # unset: alerts off


def test_cryptobot_paper_refuses_an_invalid_url_exit_78(tmp_path):
    r = _cli(["paper", "--max-candles", "1"], tmp_path, {"CRYPTOBOT_NOTIFY_URLS": f"nosuchscheme://{TOKEN}@example.com",
                                                         "CRYPTOBOT_STATE_DIR": str(tmp_path / "st")})
    assert r.returncode == 78, (r.stdout, r.stderr)
    out = r.stdout + r.stderr
    line = [l for l in out.splitlines() if "startup_refused" in l]
    assert len(line) == 1 and "nosuchscheme://example.com:****" in line[0] and "apprise" in line[0] and TOKEN not in out


def test_unlock_sends_kill_unlocked(receiver, tmp_path):
    from cryptobot.config import load_settings
    from cryptobot.guardian import Guardian
    from cryptobot.journal import Journal
    env = {"CRYPTOBOT_STATE_DIR": str(tmp_path / "var"), "CRYPTOBOT_KILL_SWITCH_LOSSES": "1",
           "CRYPTOBOT_NOTIFY_URLS": receiver.url(f"/ok/{TOKEN}")}
    s = load_settings(env=env, dotenv_path=None)
    with Journal(s.state_dir / "journal.sqlite") as j:
        g = Guardian(s, s.state_dir, j)
        g.record_trade({"trade_key": "t0", "symbol": "BTC/USDT", "entry_time": "2024-01-01T00:00:00+00:00",
                        "exit_time": "2024-01-01T00:30:00+00:00", "entry_price": 100.0, "exit_price": 98.0,
                        "amount": 1.0, "fees": 0.2, "pnl": -2.2, "exit_reason": "stop"})
        assert g.locked
    r = _cli(["unlock", "--reason", "reviewed the loss"], tmp_path, env)
    assert r.returncode == 0, r.stderr
    assert [b["title"] for _, b in receiver.got] == ["cryptobot: Kill switch unlocked (BTC/USDT)"]
    assert "reviewed the loss" in receiver.got[0][1]["message"] and TOKEN not in r.stdout + r.stderr


def test_fingerprint_refusal_reaches_the_receiver(receiver, model, tmp_path):
    emu = Emulator(frame(1_300), clock="stepped", start=1_100, api_key=KEY, api_secret=SECRET)
    emu.start()
    try:
        m = json.loads((model / "manifest.json").read_text())
        bad = tmp_path / "badmodel"
        bad.mkdir()
        for f in model.iterdir():
            if f.is_file() and f.name != "manifest.json":
                (bad / f.name).write_bytes(f.read_bytes())
        (bad / "manifest.json").write_text(json.dumps({**m, "feature_fingerprint": "0" * 64}))
        s = Settings(state_dir=tmp_path / "st", exchange_url=emu.base_url, api_key=KEY, api_secret=SECRET,
                     notify_urls=Secret(receiver.url(f"/ok/{TOKEN}")))
        with pytest.raises(StartupRefused, match="fingerprint"):
            start_runner(s, "paper", bad, max_model_age_days=None, rate_limit_ms=1.0)
        # close(5) ran before the refusal was raised: the alert is already delivered
        (body,) = [b for _, b in receiver.got]
        assert body["title"] == "cryptobot: Strategy refused at start (BTC/USDT)" and "fingerprint" in body["message"]
        assert emu.orders_created == 0
    finally:
        emu.stop()


def test_gap_through_the_stop_limit_alerts_the_emergency_exit(receiver, model, tmp_path):
    "A stop-limit triggered but not filled: the stop watch sells at market, and a person hears of it."
    r = Rig(tmp_path, model, receiver.url(f"/ok/{TOKEN}"), stop_market=False)
    try:
        r.emu.faults.add("stop_unfilled")
        r.lose_once(lock=False)
        got = r.wait_for(lambda: [b for p, b in receiver.got if "EMERGENCY" in b["title"]], "the EMERGENCY_EXIT alert", 60)
    finally:
        r.close()
    assert got[0]["title"] == "cryptobot: EMERGENCY EXIT BTC/USDT" and got[0]["type"] == "failure"
    (x,) = r.rows("SELECT amount FROM intents WHERE purpose = 'emergency_exit'")
    assert f"Closed {x['amount']} BTC/USDT at market" in got[0]["message"]
