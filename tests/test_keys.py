"""The API key's powers (Binance `GET /sapi/v1/account/apiRestrictions`), read through the real `ccxt.binance` client
from the emulator on 127.0.0.1: live trading refuses a key that can withdraw, cannot trade spot, or whose restrictions
cannot be read (single runner and portfolio, Python and CLI; exit 78, journaled, alert titled by its cause); paper only
reports; the audit's deployment-security domain fails a withdrawal-enabled or IP-unrestricted key."""
from __future__ import annotations

import io
import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from cryptobot.config import Settings
from cryptobot.emulator import Emulator
from cryptobot.live import EX_CONFIG, run, setup_logging, start_portfolio
from cryptobot.notify import REFUSAL_TITLES

KEY, SECRET = "keys-key-5e1f0a", "keys-secret-Jw83pq"
CRYPTOBOT = str(Path(sys.executable).parent / "cryptobot")
FAST = {"executor_kw": {"settle_s": 0.0, "sleep": lambda _s: None}, "retry": {"retries": 2, "base_delay": 0.01},
        "rate_limit_ms": 1.0}

# each refused key: (the emulator's restrictions, what the one line must name)
REFUSED = {
    "withdrawals": ({"enableWithdrawals": True}, "untick 'Enable Withdrawals'"),
    "withdrawals_ip_restricted_transfers": ({"enableWithdrawals": True, "enableInternalTransfer": True,
                                             "permitsUniversalTransfer": True}, "untick 'Enable Withdrawals'"),
    "no_spot_trading": ({"enableSpotAndMarginTrading": False}, "tick 'Enable Spot & Margin Trading'"),
    "trading_expired": ({"tradingAuthorityExpirationTime": 1_000}, "renew 'Enable Spot & Margin Trading'"),
    "unreadable": (False, "tick 'Enable Reading' and list this server's IP"),
}


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    from cryptobot import data as D, model as M
    c = D.synthetic_candles(n=2_200, seed=9)
    res = M.train_walk_forward(c.iloc[:1_900], n_folds=2, params={"max_iter": 20})
    return c, res.save(tmp_path_factory.mktemp("models"))


def _emu(candles, key_restrictions=None, **kw):
    e = Emulator(candles, clock="stepped", start=2_000, api_key=KEY, api_secret=SECRET, balances={"USDT": 1_000.0},
                 key_restrictions=key_restrictions, **kw)
    return e.start()


def _run(settings, model, **kw):
    buf = io.StringIO()
    setup_logging(settings, stream=buf)
    rc = run(settings, model=model, logs=False, max_model_age_days=None, settle_s=0, poll_s=0.01, min_poll_s=0.01,
             **{**FAST, **kw})
    return rc, buf.getvalue()


def _events(state_dir, kind):
    con = sqlite3.connect(f"file:{Path(state_dir) / 'journal.sqlite'}?mode=ro", uri=True)
    try:
        return [(m, json.loads(d or "null")) for m, d in con.execute(
            "SELECT message, data FROM events WHERE kind = ? ORDER BY id", (kind,)).fetchall()]
    finally:
        con.close()


def _live(tmp_path, emu, **kw):
    return Settings(state_dir=tmp_path / "st", exchange_url=emu.base_url, go_live=True, api_key=KEY, api_secret=SECRET,
                    **kw)


@pytest.mark.parametrize("case", list(REFUSED))
def test_live_refuses_a_key_that_can_withdraw_or_cannot_trade(market, tmp_path, case):
    "Python, single symbol: refused before any order, exit 78, one line naming the key page's box, journaled by cause."
    restrictions, fix = REFUSED[case]
    emu = _emu(market[0], restrictions)
    try:
        rc, out = _run(_live(tmp_path, emu), market[1], mode="live", max_candles=1, audit=lambda s: [])
    finally:
        emu.stop()
    assert rc == EX_CONFIG, out[-2000:]
    refused = [l for l in out.splitlines() if "event=startup_refused" in l]
    assert len(refused) == 1 and fix in refused[0] and "live trading refused" in refused[0], out[-2000:]
    assert emu.orders_created == 0 and KEY not in out and SECRET not in out
    ev = _events(tmp_path / "st", "start_refused")
    assert len(ev) == 1 and ev[0][1]["cause"] == "api_key" and fix in ev[0][0] and ev[0][1]["code"] == EX_CONFIG
    assert "API key" in REFUSAL_TITLES["api_key"]                 # the alert's title names the cause


def test_live_with_the_safe_key_passes_the_key_gate(market, tmp_path):
    "The safe key (spot trading, no withdrawals, IP-restricted) is not refused: the runner trades a candle live."
    emu = _emu(market[0])
    try:
        rc, out = _run(_live(tmp_path, emu), market[1], mode="live", max_candles=1, audit=lambda s: [])
    finally:
        emu.stop()
    assert rc == 0, out[-2000:]
    ev = _events(tmp_path / "st", "key_restrictions")
    assert len(ev) == 1 and ev[0][0].startswith("withdrawals off, spot trading on, IP restriction on"), ev


def _paper_candle(market, tmp_path, restrictions):
    "One paper candle against an emulator serving `restrictions` (False: unreadable): (exit code, output)."
    emu = _emu(market[0], restrictions)
    try:
        s = Settings(state_dir=tmp_path / "st", exchange_url=emu.base_url, api_key=KEY, api_secret=SECRET)
        return _run(s, market[1], mode="paper", max_candles=1)
    finally:
        emu.stop()


def test_paper_only_reports_a_withdrawal_key(market, tmp_path):
    "Paper against the emulator with a key that can withdraw and has no IP restriction: it trades, and says so."
    rc, out = _paper_candle(market, tmp_path, {"enableWithdrawals": True, "ipRestrict": False})
    assert rc == 0, out[-2000:]
    line = [l for l in out.splitlines() if "event=key_restrictions" in l]
    assert len(line) == 1, line
    assert "untick 'Enable Withdrawals'" in line[0] and "Restrict access to trusted IPs only" in line[0], line
    ev = _events(tmp_path / "st", "key_restrictions")
    assert len(ev) == 1 and ev[0][0].startswith("withdrawals on") and "live_would_refuse" in ev[0][1]
    assert not _events(tmp_path / "st", "start_refused")


def test_paper_reports_unreadable_restrictions_and_trades(market, tmp_path):
    rc, out = _paper_candle(market, tmp_path, False)
    assert rc == 0, out[-2000:]
    ev = _events(tmp_path / "st", "key_restrictions")
    assert len(ev) == 1 and "could not be read" in ev[0][0] and "-2015" in ev[0][0], ev


def _portfolio(tmp_path, restrictions, mode):
    from cryptobot.data import synthetic_candles
    from cryptobot.strategy import make_strategy, save_strategy_artifact
    candles = {"BTC/USDT": synthetic_candles(n=1_000, seed=1, start_price=10_000.0),
               "ETH/USDT": synthetic_candles(n=1_000, seed=2, start_price=500.0)}
    strat = make_strategy("ema_cross", {"fast": 3, "slow": 8})
    emu = Emulator(candles, timeframe="1h", balances={"USDT": 1_000.0}, api_key=KEY, api_secret=SECRET,
                   clock="stepped", start=640, key_restrictions=restrictions).start()
    s = Settings(state_dir=tmp_path / "state", exchange_url=emu.base_url, api_key=KEY, api_secret=SECRET,
                 symbols=tuple(candles), go_live=mode == "live")
    arts = {sym: save_strategy_artifact(strat, tmp_path / "art" / sym.replace("/", ""), symbol=sym,
                                        timeframe="1h").parent for sym in candles}
    return emu, s, lambda: start_portfolio(s, mode, arts, strategy=strat, settle_s=0.0, poll_s=0.02, min_poll_s=0.01,
                                           audit=lambda st: [], **FAST)


@pytest.mark.parametrize("case", ["withdrawals", "no_spot_trading", "unreadable"])
def test_portfolio_live_refuses_the_key_and_paper_reports_it(tmp_path, case):
    from cryptobot.live import StartupRefused
    restrictions, fix = REFUSED[case]
    emu, s, start = _portfolio(tmp_path / "live", restrictions, "live")
    try:
        with pytest.raises(StartupRefused) as e:
            start()
        assert e.value.exit_code == EX_CONFIG and e.value.cause == "api_key" and fix in str(e.value)
        assert emu.orders_created == 0
        ev = _events(s.state_dir, "start_refused")
        assert len(ev) == 1 and ev[0][1]["cause"] == "api_key", ev
    finally:
        emu.stop()
    emu, s, start = _portfolio(tmp_path / "paper", restrictions, "paper")
    try:
        pr = start()                                   # paper: reported, never refused
        pr.close()
        ev = _events(s.state_dir, "key_restrictions")
        assert len(ev) == 1 and (fix in json.dumps(ev[0][1]) or fix in ev[0][0]), ev
    finally:
        emu.stop()


def _cli(args, cwd, env, timeout=180):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("CRYPTOBOT_", "BINANCE_", "GO_LIVE"))}
    return subprocess.run([CRYPTOBOT, *args], cwd=cwd, env={**e, **env}, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("flag,fix", [("enableWithdrawals=true", "untick 'Enable Withdrawals'"),
                                      ("unreadable", "tick 'Enable Reading'")])
def test_cli_live_refuses_a_withdrawal_key_served_by_cryptobot_emulator(market, tmp_path, flag, fix):
    "`cryptobot emulator --key-restrictions ...` serves the key's powers; `cryptobot live` refuses it, exit 78."
    from cryptobot.data import save_candles
    data = save_candles(market[0], tmp_path / "market.parquet")
    emu = subprocess.Popen([CRYPTOBOT, "emulator", "--data", str(data), "--port", "0", "--start", str(market[0].index[2_000]),
                            "--api-key", KEY, "--api-secret", SECRET, "--balance", "USDT=1000",
                            "--key-restrictions", flag], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           cwd=tmp_path)
    try:
        ready = emu.stdout.readline()
        m = re.search(r"emulator ready: (http://127\.0\.0\.1:\d+)", ready)
        assert m, ready
        assert ("withdrawals ON" if "Withdrawals" in flag else "restrictions unreadable") in ready, ready
        env = {"CRYPTOBOT_STATE_DIR": str(tmp_path / "var"), "CRYPTOBOT_EXCHANGE_URL": m.group(1), "GO_LIVE": "true",
               "BINANCE_API_KEY": KEY, "BINANCE_API_SECRET": SECRET}
        r = _cli(["live", "--model", str(market[1]), "--max-candles", "1"], tmp_path, env)
    finally:
        emu.terminate()
        emu.wait(30)
    assert r.returncode == EX_CONFIG, (r.stdout + r.stderr)[-2000:]
    refused = [l for l in (r.stdout + r.stderr).splitlines() if "startup_refused" in l]
    assert len(refused) == 1 and fix in refused[0], (r.stdout + r.stderr)[-2000:]
    assert KEY not in r.stdout + r.stderr and SECRET not in r.stdout + r.stderr
    ev = _events(tmp_path / "var", "start_refused")
    assert len(ev) == 1 and ev[0][1]["cause"] == "api_key"


@pytest.mark.parametrize("restrictions,status,says", [
    ({"enableWithdrawals": True}, "FAIL", "untick 'Enable Withdrawals'"),
    ({"ipRestrict": False}, "FAIL", "Restrict access to trusted IPs only"),
    ({"enableSpotAndMarginTrading": False}, "FAIL", "tick 'Enable Spot & Margin Trading'"),
    (None, "PASS", "withdrawals off, spot trading on, IP restriction on"),
    (False, "WARN", "could not be read"),
])
def test_audit_judges_the_key(tmp_path, restrictions, status, says):
    from cryptobot import data as D
    from cryptobot.audit import run_checks
    emu = Emulator(D.synthetic_candles(n=1_200, seed=3), clock="stepped", api_key=KEY, api_secret=SECRET,
                   key_restrictions=restrictions).start()
    try:
        s = Settings(state_dir=tmp_path / "st", exchange_url=emu.base_url, api_key=KEY, api_secret=SECRET)
        (c,) = run_checks(s, only=["key_powers"], env_files=[])
    finally:
        emu.stop()
    assert (c.domain, c.name, c.status) == ("security", "key_powers", status), c
    assert says in (c.blocker or "") + c.evidence, c
    assert "\n" not in (c.blocker or "") + c.evidence and KEY not in c.evidence


def test_audit_warns_when_the_exchange_cannot_be_asked(tmp_path):
    from cryptobot.audit import run_checks
    s = Settings(state_dir=tmp_path / "st", exchange_url="http://127.0.0.1:9", api_key=KEY, api_secret=SECRET)
    (c,) = run_checks(s, only=["key_powers"], env_files=[])
    assert c.status == "WARN" and "could not be read" in c.evidence, c
    (c,) = run_checks(Settings(state_dir=tmp_path / "st"), only=["key_powers"], env_files=[])
    assert c.status == "WARN" and "no API key set" in c.evidence, c
