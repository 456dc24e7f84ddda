"""Issue 18, case 1, from the command line: `cryptobot paper` (a real process, the real ccxt client) against the
emulator on 127.0.0.1. A state dir reused against a fresh exchange account is refused before any order; a journaled
position the account does not hold is a MISMATCH (locked, alerted, no order); an entry whose fill cannot be journaled
leaves its stop on the exchange; a reset exchange's fills (trade ids from 1 again) are journaled beside the old ones."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cryptobot import data as D
from cryptobot.emulator import Emulator
from cryptobot.journal import Journal, fill_key
from cryptobot.strategy import artifact_dir, make_strategy, save_strategy_artifact
from test_notify import receiver  # noqa: F401 - a fixture

KEY, SECRET = "acct-key-7d1e", "acct-secret-Zp20qq"
CANDLES = D.synthetic_candles(n=1_500, seed=3)
RULES = '''
import os
from cryptobot.strategy import Strategy


class ByEnv(Strategy):
    "Enters, exits or holds as $ACCT_GO says (the test drives each candle's decision)."
    name = "by_env"

    @property
    def warmup(self):
        return 2

    def signals(self, candles, features=None):
        go = os.environ.get("ACCT_GO", "none")
        c = candles["close"]
        return (c > 0) & (go == "enter"), (c > 0) & (go == "exit")
'''
CODE = "import sys; from cryptobot.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.fixture
def rig(tmp_path):
    "The strategy module and its artifact; `run(args, emu, go=...)` runs the `cryptobot` command on one state dir."
    mod = tmp_path / "mod"
    mod.mkdir()
    (mod / "acct_rules.py").write_text(RULES)
    sys.path.insert(0, str(mod))
    try:
        strat = make_strategy("acct_rules:ByEnv", {})
        save_strategy_artifact(strat, artifact_dir(tmp_path / "data", strat), symbol="BTC/USDT", timeframe="1h")
    finally:
        sys.path.remove(str(mod))
        sys.modules.pop("acct_rules", None)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CRYPTOBOT_", "BINANCE_", "GO_LIVE"))}
    base.update(PYTHONPATH=os.pathsep.join([str(mod), os.environ.get("PYTHONPATH", "")]),
                CRYPTOBOT_STRATEGY="acct_rules:ByEnv", CRYPTOBOT_DATA_DIR=str(tmp_path / "data"),
                CRYPTOBOT_STATE_DIR=str(tmp_path / "st"), BINANCE_API_KEY=KEY, BINANCE_API_SECRET=SECRET)

    class Rig:
        state = tmp_path / "st"

        def run(self, args, emu=None, go="none", **env):
            e = dict(base, ACCT_GO=go, **env)
            if emu is not None:
                e["CRYPTOBOT_EXCHANGE_URL"] = emu.base_url
            return subprocess.run([sys.executable, "-c", CODE, *args], env=e, cwd=tmp_path, capture_output=True,
                                  text=True, timeout=180)

        def paper(self, emu, go="none", **env):
            return self.run(["paper", "--max-candles", "1"], emu, go, **env)

        def journal(self):
            return Journal(self.state / "journal.sqlite")

    return Rig()


def emulator(uid=None, balances=None, later=0):
    "An emulator on the stepped clock; `later` bars on (a state dir that processed candles waits for a new one)."
    return Emulator(CANDLES, clock="stepped", start=1_300 + later, api_key=KEY, api_secret=SECRET, uid=uid,
                    balances=balances or {"USDT": 10_000}).start()


def posts(emu) -> int:
    return emu.requests["POST /api/v3/order"]


def refusals(r) -> list[str]:
    return [l for l in r.stdout.splitlines() if "startup_refused" in l]


def status(rig, emu=None) -> str:
    r = rig.run(["status"], emu)
    return r.stdout + r.stderr


def test_a_state_dir_reused_against_a_fresh_emulator_is_refused_before_any_order(rig):
    emu1 = emulator()
    try:
        r = rig.paper(emu1, go="enter")
        assert r.returncode == 0 and emu1.orders_created == 2, r.stdout[-3000:]        # entry + its stop
    finally:
        emu1.stop()
    with rig.journal() as j:
        assert j.account()["uid"] == str(emu1.uid) and j.account()["reason"] == "first run on this account"
    emu2 = emulator()                                  # a fresh emulator: a fresh account, trade ids from 1 again
    try:
        assert emu2.uid != emu1.uid
        r = rig.paper(emu2, go="enter")
        [line] = refusals(r)
        assert r.returncode == 78 and "code=78" in line, r.stdout[-3000:]
        assert f"belongs to exchange account {emu1.uid}" in line and f"reports account {emu2.uid}" in line, line
        assert "new state dir" in line and "cryptobot reconcile --adopt-account" in line, line
        assert posts(emu2) == 0 and "Traceback" not in r.stdout + r.stderr
        st = status(rig)
        assert "unlocked: entries allowed" not in st and "LOCKED" in st and "exchange account mismatch" in st, st
        # the explicit path refuses while the journal holds the old account's position (one line, nothing changed)
        ad = rig.run(["reconcile", "--adopt-account"], emu2)
        assert ad.returncode == 78 and ad.stderr.count("\n") == 1 and "still holds position BTC/USDT" in ad.stderr, ad
        assert posts(emu2) == 0
        with rig.journal() as j:
            assert j.account()["uid"] == str(emu1.uid)
    finally:
        emu2.stop()


def test_a_journaled_position_the_account_does_not_hold_is_a_mismatch_locked_alerted_and_sends_nothing(rig, receiver):
    """The same account (uid), emptied: no BTC, no stop. Before: a rejected stop and exit on every turn until
    RecursionError (rc 1). Now: one MISMATCH, entries locked, an alert, zero orders; the runner keeps running locked
    (rc 0 at --max-candles), so systemd does not restart it into the same reconciliation over and over."""
    emu1 = emulator(uid=424242)
    try:
        assert rig.paper(emu1, go="enter").returncode == 0 and emu1.orders_created == 2
    finally:
        emu1.stop()
    emu2 = emulator(uid=424242, later=1)                # the account's coins and orders are gone
    url = receiver.url("/ok/x")
    try:
        r = rig.paper(emu2, go="enter", CRYPTOBOT_NOTIFY_URLS=url)
        out = r.stdout + r.stderr
        assert r.returncode == 0 and "RecursionError" not in out and "Traceback" not in out, out[-3000:]
        assert posts(emu2) == 0, emu2.orders
        mism = [l for l in r.stdout.splitlines() if "event=position_mismatch" in l]
        assert len(mism) == 1 and "held=0" in mism[0], r.stdout[-3000:]
        emu2.advance(1)                                 # another candle: still nothing sent
        r2 = rig.paper(emu2, go="exit", CRYPTOBOT_NOTIFY_URLS=url)
        assert r2.returncode == 0 and posts(emu2) == 0, r2.stdout[-3000:]
        st = status(rig)
        assert "LOCKED" in st and "reconciliation mismatch on BTC/USDT" in st and "exchange holds 0 BTC" in st, st
        titles = [b["title"] for _, b in receiver.got]
        assert any("Reconciliation MISMATCH" in t for t in titles), titles
        with rig.journal() as j:
            assert j.select("SELECT COUNT(*) AS n FROM reconciliations WHERE ok = 0")[0]["n"] >= 1
            assert len(j.open_positions()) == 1                  # the journal keeps it: a person decides
    finally:
        emu2.stop()


def test_an_entry_whose_fill_cannot_be_journaled_still_leaves_its_stop_on_the_exchange(rig):
    "The journal already holds a different fill under the key the entry's fill gets: the runner fails loud (one line,"
    "rc 1), but only after the stop is on the exchange and the journal knows the position."
    emu = emulator(uid=777)
    try:
        assert rig.paper(emu).returncode == 0 and posts(emu) == 0          # the state dir knows this account
        with rig.journal() as j:                       # the key the next entry's fill gets (order 1, trade 1)
            j.record_fill(fill_key("BTCUSDT", 1, 1, "777"), "someone-else", 1.0, 1.0)
        emu.advance(1)
        r = rig.paper(emu, go="enter")
        err = [l for l in r.stderr.splitlines() if l.strip()]
        assert r.returncode == 1 and err and "already journaled with different" in err[-1], r.stdout[-3000:] + r.stderr
        stops = [o for o in emu.orders if o["type"] == "STOP_LOSS_LIMIT" and o["status"] == "NEW"]
        assert len(stops) == 1, emu.orders
        st = status(rig)
        assert "position flat" not in st and "unlocked: entries allowed" in st or "LOCKED" in st, st
        with rig.journal() as j:
            [p] = j.open_positions()
            assert p["symbol"] == "BTC/USDT" and abs(p["amount"] - stops[0]["qty"]) < stops[0]["qty"] * 0.01
    finally:
        emu.stop()


def _round_trip(rig, emu):
    "An entry and its exit, one candle apart, on `emu`: the journal is flat again with two fills."
    assert rig.paper(emu, go="enter").returncode == 0
    emu.advance(1)
    r = rig.paper(emu, go="exit")
    assert r.returncode == 0, r.stdout[-3000:]
    with rig.journal() as j:
        assert j.open_positions() == [] and len(j.trades()) == 1


@pytest.mark.parametrize("journal", ["with_account", "older_journal"])
def test_fills_of_a_reset_exchange_are_journaled_beside_the_old_ones(rig, journal):
    """A flat state dir moved to a fresh emulator (trade and order ids from 1 again). With an account recorded: refused,
    then adopted explicitly (`cryptobot reconcile --adopt-account`, journaled with who) and unlocked. An older journal
    (fills keyed BTCUSDT-1, no account): adopted at start with a journaled event. Either way the new trade 1 is
    journaled beside the old trade 1, and the new position is protected (before: `fill BTCUSDT-1 is already journaled
    with different client_order_id, price, amount, fee`, no stop)."""
    emu1 = emulator()
    try:
        _round_trip(rig, emu1)
    finally:
        emu1.stop()
    if journal == "older_journal":                      # as a cryptobot before this change wrote it
        with rig.journal() as j:
            j._con.execute("DELETE FROM events WHERE kind = 'account'")
            j._con.execute("UPDATE fills SET trade_id = 'BTCUSDT-' || substr(trade_id, instr(trade_id, '-') + 1, "
                           "instr(trade_id, '@') - instr(trade_id, '-') - 1)")
            assert {r["trade_id"] for r in j.select("SELECT trade_id FROM fills")} == {"BTCUSDT-1", "BTCUSDT-2"}
    emu2 = emulator(later=2)
    try:
        if journal == "with_account":
            r = rig.paper(emu2, go="enter")
            assert r.returncode == 78 and posts(emu2) == 0, r.stdout[-3000:]
            ad = rig.run(["reconcile", "--adopt-account"], emu2)
            assert ad.returncode == 0 and f"now belongs to account {emu2.uid}" in ad.stdout, ad
            assert "until cryptobot unlock" in ad.stdout, ad.stdout
            assert rig.run(["unlock", "--reason", "adopted the reset testnet account"]).returncode == 0
        r = rig.paper(emu2, go="enter")
        assert r.returncode == 0 and "startup_refused" not in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
        with rig.journal() as j:
            acct = j.account()
            fills = j.select("SELECT trade_id, client_order_id FROM fills ORDER BY id")
        assert acct["uid"] == str(emu2.uid), acct
        assert acct["reason"].startswith("adopted"), acct
        if journal == "with_account":
            assert "cryptobot reconcile --adopt-account" in acct["reason"] and "uid" in acct["by"], acct
        ones = [f["trade_id"] for f in fills if f["trade_id"].split(":")[-1].split("@")[0] == "BTCUSDT-1"]
        assert len(ones) == 2 and len(set(ones)) == 2 and f"{emu2.uid}:BTCUSDT-1@1" in ones, fills
        stops = [o for o in emu2.orders if o["type"] == "STOP_LOSS_LIMIT" and o["status"] == "NEW"]
        assert len(stops) == 1 and emu2.orders_created == 2, emu2.orders
    finally:
        emu2.stop()
