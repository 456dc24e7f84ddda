"""`cryptobot journal archive`: closed history to parquet. The Guardian's rebuild (journal + checkpoint) equals the
rebuild of the un-archived journal, also with a loss streak and a kill-switch lock across the archive date; nothing
lost, nothing doubled, also after a real SIGKILL at each step; the refusals; the audit's evidence unchanged."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cryptobot import audit as A
from cryptobot.config import Settings
from cryptobot.guardian import Guardian, entry_gate, runner_lock, status_report
from cryptobot.journal import ARCHIVE_DIR, ClosedTrade, Journal, archive_runs
from cryptobot.live import stop_report

T0 = 1_704_067_200.0            # 2024-01-01 00:00 UTC
DAYS = 40
NOW = T0 + DAYS * 86400 + 7200  # the day after the last trade
CRYPTOBOT = str(Path(sys.executable).parent / "cryptobot")
# per day three round trips: a win then two losses (the streak ends each day at 2, one short of the kill switch).
# Day 20 opens with a loss: the streak that crosses midnight trips the lock; it is lifted on day 22. Day 28's first
# loss trips it again and it is never lifted: a lock that spans a second archive date.
PNL = {d: [3.0, -1.0, -1.0] for d in range(DAYS)} | {20: [-1.0, 3.0, -1.0], 28: [-1.0, -1.0, -1.0]}


def day(d: int) -> str:
    return f"2024-{1 + d // 31:02d}-{1 + d % 31:02d}"


def settings(sd: Path) -> Settings:
    return Settings(state_dir=sd, data_dir=sd.parent / "data", reports_dir=sd.parent / "reports")


def round_trip(j: Journal, k: str, t: float, pnl: float, g: Guardian, clock: list):
    "Approval, redemption + entry intent, fill, a stop (placed, later canceled), the exit and the closed trade."
    e, s, x = f"cb-e-{k}", f"cb-s-{k}", f"cb-x-{k}"
    j.record_decision(f"a-{k}", True, [], symbol="BTC/USDT", side="buy", client_order_id=e, mode="paper",
                      expires_at=t + 60, ts=t)
    j.record_redemption(f"a-{k}", e, dict(client_order_id=e, symbol="BTC/USDT", side="buy", type="market", amount=1.0,
                        price=None, stop_price=None, purpose="entry", candle_time=t, approval_id=f"a-{k}"), ts=t)
    j.record_order_status(e, "closed", "1" + k, filled=1.0, average=100.0, ts=t + 1)
    j.record_fill(f"f-{k}", e, 100.0, 1.0, fee=0.1, ts=t + 1, symbol="BTC/USDT", side="buy")
    j.record_intent(s, "BTC/USDT", "sell", "stop_loss_limit", 1.0, stop_price=95.0, purpose="stop", ts=t + 2)
    j.record_order_status(s, "open", "2" + k, filled=0.0, ts=t + 2)
    j.log_event("stop_check", "ok", dict(t=t + 3, result="ok", interval_s=60), ts=t + 3)
    j.record_feature_row(t, "f" * 64, {"ret_1": pnl}, ts=t + 3)
    j.record_order_status(s, "canceled", "2" + k, filled=0.0, ts=t + 600)
    j.record_intent(x, "BTC/USDT", "sell", "market", 1.0, purpose="exit", ts=t + 601)
    j.record_order_status(x, "closed", "3" + k, filled=1.0, average=100.0 + pnl, ts=t + 602)
    j.record_fill(f"g-{k}", x, 100.0 + pnl, 1.0, fee=0.1, ts=t + 602, symbol="BTC/USDT", side="sell")
    clock[0] = t + 603
    g.record_trade(ClosedTrade(e, "BTC/USDT", t + 1, t + 602, 100.0, 100.0 + pnl, 1.0, 0.2, pnl, "model",
                               equity_after=10_000.0 + 10 * pnl + t / 1e6))
    clock[0] = t + 3600
    g.note_candle(t + 3600, 10_000.0 + pnl)


def build(sd: Path):
    "A state dir with DAYS days of paper trading through the real Guardian (state.json + journal)."
    clock = [T0]
    j = Journal(sd / "journal.sqlite", clock=lambda: clock[0])
    g = Guardian(settings(sd), sd, j, clock=lambda: clock[0])
    for d in range(DAYS):
        if d == 22:
            clock[0] = T0 + d * 86400 + 60
            assert g.locked and g.unlock("reviewed the streak", who="tester").startswith("unlocked")
        for k, pnl in enumerate(PNL[d]):
            round_trip(j, f"{d}-{k}", T0 + d * 86400 + 3600 + k * 4 * 3600, pnl, g, clock)
        clock[0] = T0 + d * 86400 + 80_000
        j.record_reconciliation(d != 5, f"day {d}: journal and exchange agree" if d != 5 else "MISMATCH on day 5")
        if d % 7 == 3:
            j.record_poll_error(f"HTTP 503 on day {d}", kind="network")
        if d == 9:
            j.log_event("unprotected", "gap", dict(entry="cb-e-9-0", cause="stop rejected", start=clock[0],
                                                   end=clock[0] + 30, seconds=30.0))
    assert g.locked                                   # day 28's lock is still on
    j.close()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    sd = tmp_path_factory.mktemp("built") / "var"
    build(sd)
    return sd


@pytest.fixture
def sd(built, tmp_path) -> Path:
    "A fresh copy of the built state dir (the journal is closed: no -wal to carry)."
    out = tmp_path / "var"
    shutil.copytree(built, out)
    return out


def rows(sd: Path) -> dict[str, dict[int, tuple]]:
    "Every row of every table, journal + committed archive files, keyed by id; a second copy of an id fails."
    out = {}
    with Journal(sd / "journal.sqlite", readonly=True) as j:
        tables = [r["name"] for r in j.select("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE "
                                              "'sqlite_%'")]
        cut = j.checkpoint().get("cut", 0)
        for t in tables:
            out[t] = {r["id"]: tuple(sorted(r.items())) for r in j.select(f"SELECT * FROM {t}")}
    for m in archive_runs(sd / ARCHIVE_DIR):
        if m["cut"] > cut:
            continue                                   # not committed: its rows are still in the journal
        for t, f in m["files"].items():
            for r in pq.read_table(sd / ARCHIVE_DIR / f["path"]).to_pylist():
                assert r["id"] not in out[t], f"{t} row {r['id']} is both archived and in the journal"
                out[t][r["id"]] = tuple(sorted(r.items()))
    return out


def without_checkpoints(r: dict) -> dict:
    return {**r, "events": {i: v for i, v in r["events"].items() if dict(v)["kind"] != "archive_checkpoint"}}


def rebuilds(jp: Path) -> list[dict]:
    days = [day(d) for d in (0, 5, 19, 20, 21, 28, 29, 30, 39, 40)]
    with Journal(jp, readonly=True) as j:
        return [j.rebuild_guardian_state(day=d) for d in days]


def archive(sd: Path, date: str, **kw) -> dict:
    with Journal(sd / "journal.sqlite", clock=lambda: NOW) as j:
        return j.archive(sd / ARCHIVE_DIR, date, **kw)


def test_rebuild_equal_across_two_archive_runs_with_a_streak_and_a_lock_across_the_dates(sd, tmp_path):
    ref = tmp_path / "unarchived.sqlite"
    with sqlite3.connect(sd / "journal.sqlite") as src, sqlite3.connect(ref) as dst:
        src.backup(dst)
    before = rows(sd)
    gate, status = entry_gate(sd, now=NOW), status_report(settings(sd), now=NOW)
    stop = stop_report(sd / "journal.sqlite", now=NOW, since=T0)
    assert stop["stop_type"] and stop["last_check"] and len(stop["unprotected"]) == 1
    out = archive(sd, day(20))
    assert out["moved"]["trades"] == 60 and "locks" not in out["moved"]
    with Journal(sd / "journal.sqlite", readonly=True) as j:
        cp = j.checkpoint()                   # day 19 ended with two losses: the streak crosses the date
        assert j.trades()[0]["trade_key"] == "cb-e-20-0" and (cp["losses"], cp["locked"], cp["n"]) == (2, False, 60)
    assert rebuilds(sd / "journal.sqlite") == rebuilds(ref)
    out2 = archive(sd, day(30))
    assert (out2["moved"]["trades"], out2["moved"]["locks"], out2["moved"]["unlocks"]) == (30, 2, 1)
    with Journal(sd / "journal.sqlite", readonly=True) as j:
        cp = j.checkpoint()                   # day 28's lock is on across the second date
        assert cp["locked"] and cp["since"] == T0 + 28 * 86400 + 3600 + 603 and len(j.trades()) == 30
        assert j.select("SELECT COUNT(*) AS n FROM locks")[0]["n"] == 0
    assert rebuilds(sd / "journal.sqlite") == rebuilds(ref)
    rb = rebuilds(sd / "journal.sqlite")[-1]
    assert (rb["lock"]["locked"], rb["consecutive_losses"], rb["trades"]) == (True, 2, DAYS * 3)
    # the Guardian, status and the entry gate read the archived state dir exactly as before
    g2, st2 = entry_gate(sd, now=NOW), status_report(settings(sd), now=NOW)
    assert (g2.allowed, g2.reasons, g2.rebuild, g2.discrepancy) == (gate.allowed, gate.reasons, gate.rebuild,
                                                                     gate.discrepancy)
    assert st2 == status and stop_report(sd / "journal.sqlite", now=NOW, since=T0) == stop
    with Journal(sd / "journal.sqlite", clock=lambda: NOW) as j:
        n_locks = len(j.select("SELECT id FROM locks"))
        g = Guardian(settings(sd), sd, j, clock=lambda: NOW)
        assert g.locked and len(j.select("SELECT id FROM locks")) == n_locks     # no discrepancy lock journaled
    assert without_checkpoints(rows(sd)) == before                               # nothing lost, nothing doubled


def test_each_table_moves_and_the_journal_shrinks(sd):
    n0 = {t: len(v) for t, v in rows(sd).items()}
    out = archive(sd, day(30))
    with Journal(sd / "journal.sqlite", readonly=True) as j:
        n1 = {t: j.select(f"SELECT COUNT(*) AS n FROM {t}")[0]["n"] for t in n0}
    for t in ("trades", "intents", "orders", "fills", "decisions", "redemptions", "marks", "reconciliations",
              "feature_rows", "poll_errors", "locks", "unlocks", "events"):
        assert out["moved"][t] > 0 and n1[t] + out["moved"][t] == n0[t] + (t == "events"), t
    assert out["journal_bytes"][1] < out["journal_bytes"][0] / 2            # VACUUM: the file shrinks
    files = [Path(p) for p in out["files"]]
    assert all(p.exists() for p in files) and out["bytes"] == sum(p.stat().st_size for p in files if p.suffix == ".parquet")
    print(f"\n{sum(out['moved'].values())} rows moved ({out['moved']}), {out['bytes']:,} bytes of parquet, "
          f"{sum(n1.values())} rows left, journal {out['journal_bytes'][0]:,} -> {out['journal_bytes'][1]:,} bytes")


@pytest.mark.parametrize("point", ["after_file", "after_manifest", "in_transaction", "after_commit"])
def test_sigkill_at_each_step_then_rerun_loses_and_doubles_nothing(sd, point):
    before, rb0 = rows(sd), rebuilds(sd / "journal.sqlite")
    code = (f"from cryptobot.journal import Journal; j = Journal({str(sd / 'journal.sqlite')!r}, clock=lambda: {NOW}); "
            f"j.archive({str(sd / ARCHIVE_DIR)!r}, {day(20)!r}, crash_at={point!r})")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr                                   # a real SIGKILL, no cleanup ran
    assert without_checkpoints(rows(sd)) == before and rebuilds(sd / "journal.sqlite") == rb0   # readers: no doubles
    with Journal(sd / "journal.sqlite", readonly=True) as j:             # the audit's view too
        j.attach_archive(sd / ARCHIVE_DIR)
        assert len(j.trades()) == DAYS * 3
    out = archive(sd, day(20))
    if point in ("after_manifest", "in_transaction"):
        assert len(out["finished"]) == 1 and out["moved"] == {}           # the interrupted run was finished
    elif point == "after_file":
        assert out["swept"] and out["moved"]["trades"] > 0                # its stray file removed, the run redone
    assert without_checkpoints(rows(sd)) == before
    assert rebuilds(sd / "journal.sqlite") == rb0
    assert archive(sd, day(20))["moved"] == {}
    parquet = [p for p in (sd / ARCHIVE_DIR).rglob("*") if p.is_file() and p.parent.name != "runs"]
    assert len(archive_runs(sd / ARCHIVE_DIR)) == 1 and not [p for p in parquet if p.name.endswith(".tmp")]


def test_refusals_are_one_line_and_write_nothing(sd, tmp_path):
    env = {"CRYPTOBOT_STATE_DIR": str(sd)}

    def run(*args):
        e = {k: v for k, v in os.environ.items() if not k.startswith(("CRYPTOBOT_", "BINANCE_", "GO_LIVE"))}
        return subprocess.run([CRYPTOBOT, "journal", "archive", *args], cwd=tmp_path, env={**e, **env},
                              capture_output=True, text=True, timeout=120)

    def refused(r, needle):
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("cryptobot journal: "), r.stderr
        assert needle in lines[0], lines[0]
        assert not (sd / ARCHIVE_DIR).exists() and without_checkpoints(rows(sd)) == before

    before = rows(sd)
    refused(run("--before", "2024-02-30"), "is not a date: give a UTC day YYYY-MM-DD")
    refused(run("--before", "2999-01-01"), "after the start of today")
    with runner_lock(sd):                                    # a runner trading with this state dir
        refused(run("--before", day(20)), "archive refused while a runner holds the state dir")
    with Journal(sd / "journal.sqlite", clock=lambda: NOW) as j:   # a position opened on day 35, still open
        t = T0 + 35 * 86400 + 7200
        j.record_decision("a-open", True, [], symbol="BTC/USDT", side="buy", client_order_id="cb-e-open", ts=t)
        j.record_intent("cb-e-open", "BTC/USDT", "buy", "market", 1.0, approval_id="a-open", ts=t)
        j.record_order_status("cb-e-open", "closed", "9", filled=1.0, average=100.0, ts=t)
    before = rows(sd)
    refused(run("--before", day(40)), "open position BTC/USDT cb-e-open still needs its rows")
    r = run("--before", day(35), "--dry-run")
    assert r.returncode == 0 and r.stdout.startswith("dry run: would archive") and not (sd / ARCHIVE_DIR).exists()
    r = run("--before", day(35))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("archived ") and "trades 105" in lines[0] and "events " in lines[0]
    assert sum(l.startswith("  wrote ") and l.endswith(".parquet") for l in lines) == 13
    assert any(l.startswith("  wrote ") and "/runs/" in l for l in lines)
    assert without_checkpoints(rows(sd)) == before
    with Journal(sd / "journal.sqlite", readonly=True) as j:
        assert [p["client_order_id"] for p in j.open_positions()] == ["cb-e-open"]


EVIDENCE = ("paper_trades", "orders_approved", "last_reconciliation", "poll_errors", "stops_on_exchange",
            "state_matches_journal", "testnet_round_trip", "lock_persists")


def test_audit_evidence_is_the_same_after_archiving(sd, monkeypatch):
    def checks():
        with A.Evidence(settings(sd), now=NOW, ask_exchange=False, backtest=False) as ev:
            return {n: (c.status, c.evidence) for n in EVIDENCE for c in [A.run_check(n, ev)]}

    before = checks()
    assert before["paper_trades"][1].startswith(f"{DAYS * 3} closed trades")
    assert before["orders_approved"] == (A.PASS, before["orders_approved"][1])
    assert "1 failed reconciliations" in before["last_reconciliation"][1]
    archive(sd, day(20))
    archive(sd, day(30))
    assert checks() == before
    monkeypatch.setattr(A.Evidence, "journal", A._ev_journal_only)          # the audit without the archive rows
    blind = checks()
    assert blind["paper_trades"] != before["paper_trades"] and blind["orders_approved"] != before["orders_approved"]


# ------------------------------------------------------------------------------------ several symbols (issue 13)
SYMS = ("BTC/USDT", "ETH/USDT", "SOL/USDT")
PRICE3 = {"BTC/USDT": 42_000.0, "ETH/USDT": 2_000.0, "SOL/USDT": 100.0}
# (day, [(symbol, pnl), ...] one candle each, or a tuple of them for entries on the same candle). BTC locks on day 2
# and stays locked; ETH locks on day 1 and is unlocked (`unlock --symbol`) on day 3; SOL loses twice on day 4 (the
# streak crosses the first archive date, day 5) and a third time on day 7, the newest candle, where ETH also entered:
# its rows are what `Guardian.room()` reads for that candle. Wins in between keep the portfolio kill switch off.
TRADES3 = [(0, [("BTC/USDT", 3.0), ("ETH/USDT", -1.0), ("SOL/USDT", 3.0)]),
           (1, [("ETH/USDT", -1.0), ("BTC/USDT", 3.0), ("ETH/USDT", -1.0), ("SOL/USDT", 3.0), ("ETH/USDT", -1.0)]),
           (2, [("BTC/USDT", -1.0), ("SOL/USDT", 3.0), ("BTC/USDT", -1.0), ("SOL/USDT", 3.0), ("BTC/USDT", -1.0)]),
           (3, [("ETH/USDT", 3.0)]), (4, [("SOL/USDT", -1.0), ("ETH/USDT", 3.0), ("SOL/USDT", -1.0)]),
           (6, [("ETH/USDT", 3.0)]), (7, [(("ETH/USDT", 3.0), ("SOL/USDT", -1.0))])]
LAST3 = T0 + 7 * 86400 + 3600                  # the newest candle (two entries on it)
NOW3 = T0 + 8 * 86400 + 7200


def settings3(sd: Path) -> Settings:
    return Settings(state_dir=sd, data_dir=sd.parent / "data", reports_dir=sd.parent / "reports", symbols=SYMS,
                    max_open_positions=3, max_total_risk_pct=5.0)


def entry3(j: Journal, g: Guardian, k: str, sym: str, t: float, pnl: float, clock: list):
    "An approved decision on candle `t` (with its plan), redemption + entry intent, fill, exit and the closed trade."
    e, x, px = f"cb-e-{k}", f"cb-x-{k}", PRICE3[sym]
    plan = dict(notional=px, amount=1.0, entry_price=px, stop_price=px * 0.985, risk_amount=px * 0.015)
    j.record_decision(f"a-{k}", True, [], symbol=sym, side="buy", candle_time=t, plan=plan, client_order_id=e,
                      mode="paper", expires_at=t + 60, ts=t + 5)
    j.record_redemption(f"a-{k}", e, dict(client_order_id=e, symbol=sym, side="buy", type="market", amount=1.0,
                        price=None, stop_price=px * 0.985, purpose="entry", candle_time=t, approval_id=f"a-{k}"), ts=t + 6)
    j.record_order_status(e, "closed", "1" + k, filled=1.0, average=px, ts=t + 7)
    j.record_fill(f"f-{k}", e, px, 1.0, fee=0.1, ts=t + 7, symbol=sym, side="buy")
    return lambda: exit3(j, g, k, sym, t, pnl, clock)


def exit3(j, g, k, sym, t, pnl, clock):
    x, px = f"cb-x-{k}", PRICE3[sym]
    j.record_intent(x, sym, "sell", "market", 1.0, purpose="exit", ts=t + 601)
    j.record_order_status(x, "closed", "3" + k, filled=1.0, average=px + pnl, ts=t + 602)
    j.record_fill(f"g-{k}", x, px + pnl, 1.0, fee=0.1, ts=t + 602, symbol=sym, side="sell")
    clock[0] = t + 603
    g.record_trade(ClosedTrade(f"cb-e-{k}", sym, t + 7, t + 602, px, px + pnl, 1.0, 0.2, pnl, "model",
                               equity_after=10_000.0 + pnl))


def build3(sd: Path):
    clock = [T0]
    j = Journal(sd / "journal.sqlite", clock=lambda: clock[0])
    g = Guardian(settings3(sd), sd, j, clock=lambda: clock[0])
    for d, candles in TRADES3:
        if d == 3:
            clock[0] = T0 + d * 86400 + 60
            assert g.unlock_symbol("ETH/USDT", "reviewed ETH", who="tester").startswith("ETH/USDT unlocked")
        for n, c in enumerate(candles):
            t = T0 + d * 86400 + 3600 * (1 + n)
            exits = [entry3(j, g, f"{d}-{n}-{i}", sym, t, pnl, clock) for i, (sym, pnl) in
                     enumerate(c if isinstance(c[0], tuple) else [c])]
            for x in exits:
                x()
            clock[0] = t + 3600
            g.note_candle(t + 3600, 10_000.0)
    assert not g.locked                                  # the portfolio kill switch stays off: only symbols lock
    j.close()


@pytest.fixture(scope="module")
def built3(tmp_path_factory) -> Path:
    sd = tmp_path_factory.mktemp("built3") / "var"
    build3(sd)
    return sd


@pytest.fixture
def sd3(built3, tmp_path) -> Path:
    out = tmp_path / "var3"
    shutil.copytree(built3, out)
    return out


def portfolio_view(sd: Path, tmp: Path) -> dict:
    "symbol_locks, room() on the newest candle, status, and the Guardian's answer per symbol on the next candle."
    from cryptobot.guardian import Context, Signal, format_status, symbol_locks
    from cryptobot.risk import Market
    s = settings3(sd)
    with Journal(sd / "journal.sqlite", readonly=True) as j:
        out = dict(locks=symbol_locks(j, s.kill_switch_losses))
    st = status_report(s, now=NOW3)
    out.update(status=st, screen=format_status(st), gate=entry_gate(sd, now=NOW3).reasons)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(sd, tmp)                             # approving journals a decision: ask a throw-away copy
    with Journal(tmp / "journal.sqlite", clock=lambda: NOW3 + 10) as j:
        g = Guardian(s, tmp, j, clock=lambda: NOW3 + 10)
        out["room"] = {sym: g.room(sym, LAST3, 10_000.0) for sym in SYMS}
        t = NOW3                                     # a later candle: the entry gate per symbol
        c = Context(now=t + 10, last_candle_close=t, feature_fingerprint="fp", mode="paper", free_quote=10_000.0,
                    equity=10_000.0, reconciled=True)
        out["approve"] = {}
        for sym in SYMS:
            plan = g.size_entry(sym, t, PRICE3[sym], c, Market(symbol=sym))
            d = g.approve(Signal(sym, "buy", t, "fp"), plan, c)
            out["approve"][sym] = (bool(d), [str(r) for r in getattr(d, "reasons", ())], str(d)[:300] if not d else "")
    return out


def test_three_symbols_kill_switches_room_and_status_equal_across_archive_runs(sd3, tmp_path):
    ref = portfolio_view(sd3, tmp_path / "probe")
    locks = ref["locks"]
    assert locks["BTC/USDT"]["locked"] and locks["BTC/USDT"]["since"] == T0 + 2 * 86400 + 5 * 3600 + 603
    assert not locks["ETH/USDT"]["locked"] and locks["SOL/USDT"]["locked"] and locks["SOL/USDT"]["losses"] == 3
    assert [sym for sym, a in ref["approve"].items() if not a[0]] == ["BTC/USDT", "SOL/USDT"]
    assert "kill switch for BTC/USDT" in ref["approve"]["BTC/USDT"][2] and ref["approve"]["ETH/USDT"][0]
    assert len(ref["room"]["BTC/USDT"].positions) == 0 and ref["room"]["BTC/USDT"].reserved_quote > 0
    assert set(ref["status"]["symbol_locks"]) == {"BTC/USDT", "SOL/USDT"}
    out = archive3(sd3, day(5))                      # SOL's streak (2) and BTC's lock (day 2) cross this date
    assert out["moved"]["trades"] > 0
    with Journal(sd3 / "journal.sqlite", readonly=True) as j:
        cp = j.checkpoint()
        assert cp["symbols"]["SOL/USDT"]["losses"] == 2 and len(cp["symbols"]["BTC/USDT"]["reached"]) == 3
        assert not j.select("SELECT 1 FROM events WHERE kind = 'trade' AND json_extract(data, '$.symbol') = "
                            "'BTC/USDT' AND id >= ?", (cp["cut"],))          # BTC's lock lives in the checkpoint only
    assert portfolio_view(sd3, tmp_path / "probe") == ref
    out = archive3(sd3, day(8))                      # everything up to the newest candle is older than this date
    with Journal(sd3 / "journal.sqlite", readonly=True) as j:
        kept = {r["symbol"] for r in j.select("SELECT symbol FROM decisions WHERE candle_time = ?", (LAST3,))}
        assert kept == {"ETH/USDT", "SOL/USDT"}      # room()'s rows for the newest candle stayed
    assert portfolio_view(sd3, tmp_path / "probe") == ref


def archive3(sd: Path, date: str, **kw) -> dict:
    with Journal(sd / "journal.sqlite", clock=lambda: NOW3) as j:
        return j.archive(sd / ARCHIVE_DIR, date, **kw)


@pytest.mark.parametrize("point", ["after_file", "after_manifest", "in_transaction", "after_commit"])
def test_three_symbols_sigkill_during_archive_keeps_the_kill_switches(sd3, tmp_path, point):
    ref = portfolio_view(sd3, tmp_path / "probe")
    code = (f"from cryptobot.journal import Journal; j = Journal({str(sd3 / 'journal.sqlite')!r}, clock=lambda: {NOW3});"
            f" j.archive({str(sd3 / ARCHIVE_DIR)!r}, {day(5)!r}, crash_at={point!r})")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr
    assert portfolio_view(sd3, tmp_path / "probe") == ref                 # after the kill, before the rerun
    archive3(sd3, day(5))
    assert portfolio_view(sd3, tmp_path / "probe") == ref
    assert archive3(sd3, day(8))["moved"] and portfolio_view(sd3, tmp_path / "probe") == ref
