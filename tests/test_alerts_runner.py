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

import pandas as pd
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


def _run_to_lock(tmp, model, url, **kw):
    r = Rig(tmp, model, url, **kw)
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


def _orders_at_own_fill(rig):
    "The rig's intents, each stop's price checked to be 1.5 % below its own entry's average fill (floored to the "
    "tick) and then left out: the fill prices follow the wall clock, so each rig's stop follows its own fill."
    orders, entry = rig.orders(), None
    for o in orders:
        if o["purpose"] == "entry":
            entry = o
        elif o["purpose"] == "stop":
            f = rig.rows("SELECT price, amount FROM fills WHERE client_order_id = ?", (entry["client_order_id"],))
            avg = sum(x["price"] * x["amount"] for x in f) / sum(x["amount"] for x in f)
            tick = rig.runner.executor.market.price_tick
            assert avg * 0.985 - tick < o["stop_price"] <= avg * 0.985, (o["stop_price"], avg)
    return [dict(o, stop_price=None) if o["purpose"] == "stop" else o for o in orders]


def test_dead_or_hanging_receiver_trades_exactly_the_same_and_is_journaled(receiver, model, tmp_path):
    "A lock late on 2024-02-15, then the day roll: with a hanging or refusing receiver the same orders, the same lock "
    "and the same journaled daily summary as with a good one; each failed alert journaled."
    import pandas as pd
    rigs, start = {}, frame(1_300).index[1_101] + pd.Timedelta(minutes=40)

    def go(name, url):
        rigs[name] = _run_to_lock(tmp_path / name, model, url, start=start)

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
        want = _orders_at_own_fill(rigs["ok"])
        assert [o["purpose"] for o in want] == ["entry", "stop"]
        for name in ("hang", "refused"):
            assert _orders_at_own_fill(rigs[name]) == want, name      # same orders, amounts, planned prices
            assert rigs[name].runner.guardian.locked
            text = json.dumps(rigs[name].rows("SELECT * FROM events"))
            assert TOKEN not in text
        assert not rigs["ok"].rows("SELECT * FROM events WHERE kind = 'notify_failed'")
        summaries = {n: r.wait_for(lambda r=r: r.rows("SELECT data FROM events WHERE kind = 'daily_summary'"),
                                   f"the daily summary ({n})", 60) for n, r in rigs.items()}
        for name, rows in summaries.items():                        # the fill prices follow the wall clock: PnL
            (d,) = [json.loads(x["data"]) for x in rows]              # is each rig's own trade, the rest the same
            (t,) = rigs[name].rows("SELECT pnl FROM trades")
            assert d.pop("pnl") == pytest.approx(t["pnl"]) and "LOCKED" in d["kill_switch"]
            summaries[name] = d
        assert summaries["hang"] == summaries["refused"] == summaries["ok"]
        for name in ("hang", "refused"):
            rigs[name].wait_for(lambda n=name: rigs[n].rows("SELECT * FROM events WHERE kind = 'notify_failed' AND "
                                                            "data LIKE '%daily_summary%'"), f"its failure ({name})", 30)
            assert _orders_at_own_fill(rigs[name]) == want, name
        assert [b["title"] for p, b in receiver.got if p.startswith("/ok/") and "Daily" in b["title"]] == \
            ["cryptobot: Daily summary 2024-02-15"]
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
    "A URL apprise rejects is refused where the settings are read, as `Notifier` checks it: one line, masked."
    from cryptobot.config import ConfigError, load_settings
    bad = f"nosuchscheme://user:{TOKEN}@example.com/x"
    for make in (lambda: Settings(state_dir=tmp_path / "st", notify_urls=Secret(bad)),
                 lambda: load_settings({"CRYPTOBOT_NOTIFY_URLS": bad, "CRYPTOBOT_STATE_DIR": str(tmp_path / "st")}, None)):
        with pytest.raises(ConfigError) as e:
            make()
        assert e.value.key == "CRYPTOBOT_NOTIFY_URLS" and "nosuchscheme://example.com:****" in str(e.value)
        assert TOKEN not in str(e.value) and "\n" not in str(e.value) and "apprise" in str(e.value)
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


@pytest.mark.parametrize("bad", [f"nosuchscheme://{TOKEN}@example.com", f"json:/127.0.0.1/{TOKEN}",
                                 f"json://127.0.0.1:8080/ok, tgram://{TOKEN}", f"127.0.0.1:8080/{TOKEN}"])
def test_config_and_paper_refuse_an_invalid_url_alike_exit_78(tmp_path, bad):
    "Issue 18 case 10: `cryptobot config` exited 0 where `run` exited 78; both now refuse with the same one line."
    env = {"CRYPTOBOT_NOTIFY_URLS": bad, "CRYPTOBOT_STATE_DIR": str(tmp_path / "st")}
    lines = {}
    for cmd in (["config"], ["paper", "--max-candles", "1"]):
        r = _cli(cmd, tmp_path, env)
        assert r.returncode == 78, (cmd, r.stdout, r.stderr)
        assert r.stdout == "" and len(r.stderr.splitlines()) == 1 and TOKEN not in r.stderr
        lines[cmd[0]] = r.stderr.strip().removeprefix(f"cryptobot {cmd[0]}: ")
    assert lines["config"] == lines["paper"]
    assert lines["config"].startswith("CRYPTOBOT_NOTIFY_URLS entry ") and "apprise" in lines["config"]


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
        assert body["title"] == "cryptobot: Model refused: feature fingerprint (BTC/USDT)"    # the reason, named
        assert "trained with feature fingerprint 000000000000, this code computes" in body["message"]
        assert body["type"] == "failure" and "nothing was traded" in body["message"]
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


def _titles(receiver, word):
    return [b for _, b in receiver.got if word in b["title"]]


class _FastMarketRig(RunnerRig):
    "The rig whose exchange clock runs 55 minutes on between the entry's fill and the first stop request."

    def start_runner(self, model, **runner_kw):
        runner = super().start_runner(model, **runner_kw)
        send, moved = runner.executor.venue.create_order, []

        def fast_market(symbol, type_, side, amount, price=None, params=None):
            if (params or {}).get("stopLossPrice") and not moved:
                moved.append(self.emu.set_time(self.df.index[1_101] + pd.Timedelta(minutes=55)))
            return send(symbol, type_, side, amount, price, params)
        runner.executor.venue.create_order = fast_market
        return runner


def test_stop_rejected_reaches_the_receiver_with_the_emergency_exit(receiver, model, tmp_path):
    "The entry bar falls 5 % from its open before the stop reaches the exchange (a fast market): the exchange refuses "
    "the stop (it would trigger immediately), the runner sells at market, and a person hears both."
    df = frame(1_300)
    o = float(df["close"].iloc[1_100])
    df.iloc[1_101, :4] = [o, o, o * 0.95, o * 0.951]                 # the entry bar: open, then 5 % down
    r = _FastMarketRig(tmp_path, model, stop_market=True, notify_kw=FAST, df=df,
                       settings={"kill_switch_losses": 1, "notify_urls": Secret(receiver.url(f"/ok/{TOKEN}"))})
    try:
        got = r.wait_for(lambda: _titles(receiver, "Stop not in place"), "the STOP_FAILED alert", 60)
        ex = r.wait_for(lambda: _titles(receiver, "EMERGENCY"), "the EMERGENCY_EXIT alert", 30)
    finally:
        r.close()
    (rej,) = r.rows("SELECT data FROM events WHERE kind = 'stop_rejected'")
    stop = json.loads(rej["data"])["stop"]
    assert got[0]["title"] == "cryptobot: Stop not in place: BTC/USDT" and got[0]["type"] == "failure"
    assert f"Stop order {stop} was rejected: " in got[0]["message"] and "immediately" in got[0]["message"].lower()
    assert len(got) == 1
    (x,) = r.rows("SELECT amount FROM intents WHERE purpose = 'emergency_exit'")
    assert ex[0]["message"].startswith(f"Closed {x['amount']} BTC/USDT at market: the stop was rejected")


def test_stop_not_acknowledged_reaches_the_receiver(receiver, model, tmp_path):
    "Every stop check fails (5xx on GET order) for longer than two intervals: the stop's state is unknown, said once."
    r = Rig(tmp_path, model, receiver.url(f"/ok/{TOKEN}"), settings={"kill_switch_losses": 3},
            executor_kw={"retry": {"retries": 1, "base_delay": 0.05}})
    try:
        st = r.wait_for(r.stop_order, "the stop after the entry", 60)
        r.emu.faults.add("server_error", count=10**6, endpoint="order", method="GET")
        got = r.wait_for(lambda: _titles(receiver, "Stop not in place"), "the STOP_FAILED alert", 60)
        n_err = len(r.rows("SELECT id FROM events WHERE kind IN ('poll_error', 'stop_unknown')"))
        r.wait_for(lambda: len(r.rows("SELECT id FROM events WHERE kind IN ('poll_error', 'stop_unknown')")) >= n_err + 5,
                   "five more failed checks or polls", 60)
        r.emu.faults.clear()
    finally:
        r.close()
    assert got[0]["title"] == "cryptobot: Stop not in place: BTC/USDT" and got[0]["type"] == "failure"
    assert f"Stop order {st['client_order_id']} was not acknowledged: " in got[0]["message"]
    assert "new entries are locked" in got[0]["message"]
    assert len(_titles(receiver, "Stop not in place")) == 1                 # rate-limited: not once per failed check


def test_reconciliation_mismatch_at_start_reaches_the_receiver(receiver, model, tmp_path):
    "An open order the journal does not know (placed by hand): the start-up reconciliation fails and says which."
    from cryptobot.client import make_client
    emu = Emulator(frame(1_300), clock="stepped", start=1_100, api_key=KEY, api_secret=SECRET)
    emu.start()
    try:
        hand = make_client(api_key=KEY, api_secret=SECRET, base_url=emu.base_url)
        hand.load_markets()
        hand.create_order("BTC/USDT", "limit", "buy", 0.001, 20_000.0, {"clientOrderId": "by-hand-7"})
        s = Settings(state_dir=tmp_path / "st", exchange_url=emu.base_url, api_key=KEY, api_secret=SECRET,
                     notify_urls=Secret(receiver.url(f"/ok/{TOKEN}")))
        r = start_runner(s, "paper", model, max_model_age_days=None, rate_limit_ms=1.0, notify_kw=FAST)
        try:
            assert r.executor.reconciled is False
            assert r.notifier.flush(20)
        finally:
            r.close()
            r.journal.close()
        assert emu.orders_created == 1                                      # only the hand's order
    finally:
        emu.stop()
    (body,) = _titles(receiver, "MISMATCH")
    assert body["title"] == "cryptobot: Reconciliation MISMATCH BTC/USDT" and body["type"] == "failure"
    assert "Journal and exchange disagree: NOT reconciled" in body["message"]
    assert "1 unknown open orders (by-hand-7)" in body["message"] and TOKEN not in body["message"]


def test_stale_data_alerts_once_and_once_more_when_it_recovers(receiver, model, tmp_path):
    "The exchange stops answering klines: one STALE_DATA past a candle + CRYPTOBOT_MAX_DATA_AGE_S, not one per "
    "poll; klines back: one DATA_RECOVERED."
    r = Rig(tmp_path, model, receiver.url(f"/ok/{TOKEN}"), settings={"max_data_age_s": 60},
            retry={"retries": 1, "base_delay": 0.05})
    try:
        r.wait_for(lambda: r.rows("SELECT id FROM events WHERE kind = 'candle_done'"), "a first candle", 60)
        last = r.runner.last_done
        r.emu.faults.add("server_error", count=10**6, endpoint="klines")
        stale = r.wait_for(lambda: _titles(receiver, "Stale data"), "the STALE_DATA alert", 90)
        n_err = len(r.rows("SELECT id FROM events WHERE kind = 'poll_error'"))
        r.wait_for(lambda: len(r.rows("SELECT id FROM events WHERE kind = 'poll_error'")) >= n_err + 5,
                   "five more failed polls", 60)
        assert not _titles(receiver, "Data back")
        r.emu.faults.clear()
        back = r.wait_for(lambda: _titles(receiver, "Data back"), "the DATA_RECOVERED alert", 60)
    finally:
        r.close()
    assert len(_titles(receiver, "Stale data")) == 1 and len(_titles(receiver, "Data back")) == 1
    assert stale[0]["title"] == "cryptobot: Stale data BTC/USDT" and stale[0]["type"] == "warning"
    assert "(limit 61 min)" in stale[0]["message"] and "no new entries until data returns" in stale[0]["message"]
    from cryptobot.journal import iso
    assert f"Last candle: {iso(last)}." in stale[0]["message"]
    assert back[0]["title"] == "cryptobot: Data back BTC/USDT" and back[0]["message"].startswith("Fresh candles again")
    (d,) = [json.loads(x["data"]) for x in r.rows("SELECT data FROM events WHERE kind = 'data_stale'")]
    assert d["last_candle"] == last and d["age_s"] > d["limit_s"] == 3600 + 60
    assert len(r.rows("SELECT id FROM events WHERE kind = 'data_recovered'")) == 1


def test_daily_summary_at_the_utc_day_roll_once_across_a_restart(receiver, model, tmp_path):
    "A losing trade late on 2024-02-15; at 00:00 UTC (exchange time) the day's summary; a restart after it sends no "
    "second one (journaled)."
    import pandas as pd
    df = frame(1_300)
    r = Rig(tmp_path, model, receiver.url(f"/ok/{TOKEN}"), df=df, settings={"kill_switch_losses": 3},
            start=df.index[1_101] + pd.Timedelta(minutes=40))
    assert str(df.index[1_104]) == "2024-02-16 00:00:00+00:00"
    try:
        r.lose_once(lock=False)                                             # the stop fills in 23:00-24:00
        got = r.wait_for(lambda: _titles(receiver, "Daily summary"), "the DAILY_SUMMARY alert", 60)
        r.restart()
        n_done = len(r.rows("SELECT id FROM events WHERE kind = 'candle_done'"))
        r.wait_for(lambda: len(r.rows("SELECT id FROM events WHERE kind = 'candle_done'")) > n_done,
                   "a candle after the restart", 60)
        assert r.runner.notifier.flush(20)
    finally:
        r.close()
    (trade,) = r.rows("SELECT pnl, exit_time FROM trades")
    assert trade["exit_time"] < df.index[1_104].timestamp() and trade["pnl"] < 0
    assert len(_titles(receiver, "Daily summary")) == 1                     # once, across the restart
    (ev,) = [json.loads(x["data"]) for x in r.rows("SELECT data FROM events WHERE kind = 'daily_summary'")]
    assert got[0]["title"] == "cryptobot: Daily summary 2024-02-15" and got[0]["type"] == "info"
    lines = got[0]["message"].splitlines()
    assert lines[0] == f"PnL {trade['pnl']:+.2f} USDT over 1 closed trade(s)."
    assert lines[-1] == "Kill switch: off (1 consecutive loss(es))."
    pos = ev["open_positions"]
    assert lines[1] == "Open positions: " + (", ".join(f"{k} {v}" for k, v in pos.items()) or "none") + "."
    held = r.rows("SELECT client_order_id FROM intents WHERE purpose = 'entry' AND candle_time = ?",
                  (df.index[1_104].timestamp(),))
    assert bool(pos) == bool(held)                                          # the 00:00 entry, if the runner made one
    assert ev["day"] == "2024-02-15" and ev["trades"] == 1 and ev["pnl"] == pytest.approx(trade["pnl"])


def test_audit_verdict_reaches_the_receiver_masked(receiver, tmp_path):
    "`cryptobot audit` with alerts on: the verdict, risk score and first blockers reach a person; a target that "
    "refuses is journaled; the exit code stays the audit's; no key, secret or URL token in what was sent."
    from cryptobot.journal import Journal
    Journal(tmp_path / "st" / "journal.sqlite").close()                     # a state dir that has a journal
    api_key, api_secret = "AUDkey1234abcd", "AUDsecret5678efgh"
    env = {"CRYPTOBOT_STATE_DIR": str(tmp_path / "st"), "CRYPTOBOT_REPORTS_DIR": str(tmp_path / "rep"),
           "CRYPTOBOT_DATA_DIR": str(tmp_path / "data"), "BINANCE_API_KEY": api_key, "BINANCE_API_SECRET": api_secret,
           "CRYPTOBOT_NOTIFY_URLS": f"{receiver.url(f'/ok/{TOKEN}')}, json://127.0.0.1:{closed_port()}/{TOKEN}"}
    r = _cli(["audit", "--quiet", "--date", "2026-11-28"], tmp_path, env)
    assert r.returncode == 1, (r.stdout, r.stderr)                          # FAIL: an empty state dir
    rep = json.loads((tmp_path / "rep" / "audit-2026-11-28.json").read_text())
    (body,) = _titles(receiver, "Audit")
    assert body["title"] == "cryptobot: Audit 2026-11-28: FAIL" and body["type"] == "failure"
    lines = body["message"].splitlines()
    n = len(rep["blockers"])
    assert lines[0] == f"Risk score {rep['risk_score']:g}/100. {n} blocker(s), the first {min(n, 5)}:"
    assert [l[:60] for l in lines[1:]] == [f"- {b}"[:60] for b in rep["blockers"][:5]]
    sent = json.dumps([b for _, b in receiver.got]) + r.stdout + r.stderr
    assert api_key not in sent and api_secret not in sent and TOKEN not in sent
    with Journal(tmp_path / "st" / "journal.sqlite", readonly=True) as j:
        (failed,) = j.last_events(5, kind="notify_failed")
    assert failed["data"]["alert"] == "audit_verdict" and failed["data"]["target"] == "json://127.0.0.1:****"


def _locked_state(env):
    "A state dir whose kill switch is locked by one losing trade (settings from `env`)."
    from cryptobot.config import load_settings
    from cryptobot.guardian import Guardian
    from cryptobot.journal import Journal
    s = load_settings(env=env, dotenv_path=None)
    with Journal(s.state_dir / "journal.sqlite") as j:
        g = Guardian(s, s.state_dir, j)
        g.record_trade({"trade_key": "t0", "symbol": "BTC/USDT", "entry_time": "2024-01-01T00:00:00+00:00",
                        "exit_time": "2024-01-01T00:30:00+00:00", "entry_price": 100.0, "exit_price": 98.0,
                        "amount": 1.0, "fees": 0.2, "pnl": -2.2, "exit_reason": "stop"})
        assert g.locked
    return s


def test_unlock_reason_and_sudo_user_are_masked_and_one_line_everywhere(receiver, tmp_path):
    "Issue 18 case 8: a key, a secret and the alert URL's token typed into --reason are masked in stdout, stderr, the "
    "journal and the alert; a newline in --reason or in $SUDO_USER cannot start a second (forged) line anywhere."
    api_key, api_secret = "SEKRET123abcKEY", "SEKRET456defSECRET"
    env = {"CRYPTOBOT_STATE_DIR": str(tmp_path / "var"), "CRYPTOBOT_KILL_SWITCH_LOSSES": "1",
           "CRYPTOBOT_NOTIFY_URLS": receiver.url(f"/ok/{TOKEN}"), "BINANCE_API_KEY": api_key,
           "BINANCE_API_SECRET": api_secret}
    s = _locked_state(env)
    reason = (f"checked; key {api_key} rotated, secret {api_secret}, hook {TOKEN}\nunlocked by mallory\r\n"
              "\x1b[2Kunlocked by mallory")
    r = _cli(["unlock", "--reason", reason], tmp_path,
             {**env, "SUDO_USER": "alice-nosuchuser approved by risk team\nunlocked by mallory"})
    assert r.returncode == 0, r.stderr
    import sqlite3
    con = sqlite3.connect(s.state_dir / "journal.sqlite")
    con.row_factory = sqlite3.Row
    rows = [dict(x) for t in ("events", "unlocks") for x in con.execute(f"SELECT * FROM {t}")]
    (unlock,) = [dict(x) for x in con.execute("SELECT who, reason FROM unlocks")]
    con.close()
    (alert,) = [b for _, b in receiver.got]
    texts = {"stdout": r.stdout, "stderr": r.stderr, "alert": alert["title"] + "\n" + alert["message"],
             **{f"journal {k}": str(v) for x in rows for k, v in x.items()}}
    for where, text in texts.items():
        for secret in (api_key, api_secret, TOKEN):
            assert secret not in text, f"{secret} in {where}"
        assert not [ln for ln in text.splitlines() if ln.lstrip("\x1b[2K").startswith("unlocked by mallory")], where
        assert "\x1b" not in text and "\r" not in text, where
    assert "\n" not in unlock["who"] + unlock["reason"]
    assert 'unverified SUDO_USER="alice-nosuchuser approved by risk team\\nunlocked by mallory"' in unlock["who"]
    assert unlock["reason"].startswith("checked; key **** rotated, secret ****, hook ****\\nunlocked by mallory")
    assert "Reason given: checked; key **** rotated" in alert["message"]
    assert r.stdout.count("\n") == 1 and "unverified SUDO_USER" in r.stdout


def test_refusal_is_titled_by_its_cause_and_journaled_with_its_alert_failure(receiver, tmp_path):
    "Issue 18 case 9: a strategy-parameter mismatch is titled as such (not 'feature fingerprint'); with a journal in "
    "the state dir the refusal and the refusing receiver's failure are journaled; without one nothing is created."
    import dataclasses
    from cryptobot.journal import Journal
    from cryptobot.strategy import EmaCross, artifact_dir, save_strategy_artifact
    from runner_rig import read_rows
    emu = Emulator(frame(1_300), clock="stepped", start=1_100, api_key=KEY, api_secret=SECRET)
    emu.start()
    try:
        data = tmp_path / "data"
        save_strategy_artifact(EmaCross(fast=12, slow=26), artifact_dir(data, EmaCross()), symbol="BTC/USDT",
                               timeframe="1h")
        urls = f"{receiver.url(f'/ok/{TOKEN}')},json://127.0.0.1:{closed_port()}/{TOKEN}"      # one good, one refusing
        s = Settings(state_dir=tmp_path / "st", data_dir=data, exchange_url=emu.base_url, api_key=KEY,
                     api_secret=SECRET, strategy="ema_cross", strategy_params="fast=13,slow=26",
                     notify_urls=Secret(urls))
        Journal(s.state_dir / "journal.sqlite").close()                       # a state dir that has run before
        with pytest.raises(StartupRefused, match="differs in its parameters"):
            start_runner(s, "paper", notify_kw=FAST, rate_limit_ms=1.0)
        (body,) = [b for _, b in receiver.got]
        assert body["title"] == "cryptobot: Strategy refused: parameters differ from the backtest (BTC/USDT)"
        rows = read_rows(s.state_dir, "SELECT kind, message, data FROM events ORDER BY id")
        assert [r["kind"] for r in rows] == ["start_refused", "notify_failed"]
        assert json.loads(rows[0]["data"])["cause"] == "strategy_parameters"
        assert "differs in its parameters" in rows[0]["message"] and "\n" not in rows[0]["message"]
        failed = json.loads(rows[1]["data"])
        assert (failed["alert"], failed["target"]) == ("start_refused", "json://127.0.0.1:****")
        assert TOKEN not in json.dumps([dict(r) for r in rows])
        s2 = dataclasses.replace(s, state_dir=tmp_path / "new")                # no state dir: alerted, none created
        with pytest.raises(StartupRefused, match="differs in its parameters"):
            start_runner(s2, "paper", notify_kw=FAST, rate_limit_ms=1.0)
        assert len(receiver.got) == 2 and not s2.state_dir.exists()
        assert emu.orders_created == 0
    finally:
        emu.stop()


def test_runner_stopping_while_a_hung_receiver_times_out_journals_the_failure(receiver, model, tmp_path, caplog):
    "Issue 18 case 9: the kill-switch alert hangs in the receiver when the runner stops; the shutdown waits (bounded) "
    "for that attempt, journals its failure while the journal is open, and nothing ever calls the closed journal."
    caplog.set_level(logging.WARNING)
    r = RunnerRig(tmp_path, model, notify_kw=dict(timeout_s=6, attempts=1),
                  settings={"kill_switch_losses": 1, "notify_urls": Secret(receiver.url(f"/hang/{TOKEN}"))})
    try:
        r.lose_once()
        r.wait_for(lambda: [b for _, b in receiver.got if "LOCKED" in b["title"]], "the lock alert in flight", 60)
        assert not r.rows("SELECT * FROM events WHERE kind = 'notify_failed'")    # still hanging in the receiver
    finally:
        r.close()                                      # SIGTERM's path: the run loop ends, the runner closes
    r.runner.journal.close()                           # as `live.run` does once the runner returns
    r.runner.notifier._thread.join(30)
    assert not r.runner.notifier._thread.is_alive()
    (failed,) = r.rows("SELECT data FROM events WHERE kind = 'notify_failed'")
    assert json.loads(failed["data"])["alert"] == "kill_locked"
    assert "could not record" not in caplog.text and "Cannot operate on a closed database" not in caplog.text


def test_portfolio_refusal_is_titled_and_journaled_like_one_symbols(receiver, tmp_path):
    "One symbol is a portfolio of one: a portfolio whose ETH artifact was backtested on another market is refused "
    "with that title, naming ETH, and the refusal and the refusing receiver's failure land in its existing journal."
    from cryptobot.journal import Journal
    from cryptobot.strategy import make_strategy, save_strategy_artifact
    from runner_rig import read_rows
    from test_portfolio import SYMS, _alerting_portfolio
    strat = make_strategy("ema_cross", {"fast": 3, "slow": 8})
    arts = {sym: save_strategy_artifact(strat, tmp_path / "art" / sym.replace("/", ""), timeframe="1h",
                                        symbol="BTC/USDT" if sym == "ETH/USDT" else sym).parent for sym in SYMS}
    Journal(tmp_path / "state" / "journal.sqlite").close()                 # a state dir that has run before
    urls = f"{receiver.url(f'/ok/{TOKEN}')},json://127.0.0.1:{closed_port()}/{TOKEN}"
    with pytest.raises(StartupRefused, match="ETH/USDT: strategy .* was backtested on BTC/USDT 1h"):
        _alerting_portfolio(tmp_path, urls, arts=arts, hand_order=False)
    (body,) = [b for _, b in receiver.got]
    assert body["title"] == "cryptobot: Strategy refused: backtested on another market (ETH/USDT)"
    rows = read_rows(tmp_path / "state", "SELECT kind, data FROM events ORDER BY id")
    assert [r["kind"] for r in rows] == ["start_refused", "notify_failed"]
    assert {k: json.loads(rows[0]["data"])[k] for k in ("cause", "symbol")} == \
        {"cause": "strategy_market", "symbol": "ETH/USDT"}
    assert json.loads(rows[1]["data"])["alert"] == "start_refused" and TOKEN not in json.dumps(rows)
