"""The portfolio soak: 3 symbols in one runner process on an accelerated (stepped) clock, the real emulator on
127.0.0.1 and the real `ccxt.binance` client, random exchange faults (429, 418, 5xx, -1001, timeouts, lost
responses, dropped connections, partial fills), a full disk on the state dir, and repeated SIGKILLs of the runner at
random crash points and random moments, each followed by a restart.

After every restart (once the new runner has reconciled and finished the current candle for every symbol) and at the
end: no duplicate order (client order ids unique, one entry per signal candle per symbol), no position without its stop
on the exchange (a position the stop watch has not yet protected is allowed until the next candle), no lost fill
(emulator fills == journal fills), the portfolio limits never exceeded (open positions, total open planned risk, cash
committed on one candle), and the Guardian's state equal to the journal's rebuild. The shared checks live in
tests/crashkit.py (the single-symbol soak, tests/test_live_crash.py, uses the same).

The full disk: the state dir is a loop-mounted 128 MB ext4 file system (no reserved blocks), filled with a ballast file
until a write fails with ENOSPC, for about a second of a candle, then freed. That needs root (mount); without it the
soak runs without the disk fault and says so.

`make test` runs the short version (3 simulated days, 20 kills, 2 seeds). The long one:
    CRYPTOBOT_SOAK_DAYS=30 CRYPTOBOT_SOAK_KILLS=200 CRYPTOBOT_SOAK_SEEDS=1 pytest -s tests/test_portfolio_soak.py"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from cryptobot.live import CRASH_POINTS, EX_IOERR, EX_UNAVAILABLE
from crashkit import ForkServer, check_invariants, done_candles, held_from_fills

KEY, SECRET = "soak-key-5c2a", "soak-secret-Pq81vd"
SYMS = ("BTC/USDT", "ETH/USDT", "SOL/USDT")
OWN_FILTERS = {"ETH/USDT": {"step_size": "0.0001", "min_qty": "0.0001", "min_notional": "10"},
               "SOL/USDT": {"step_size": "0.01", "min_qty": "0.01", "tick_size": "0.001", "min_price": "0.001"}}
LIMITS = {"max_open_positions": 2, "max_total_risk_pct": 1.5}
START = 640                     # candles of history before the replay starts (the strategy's warm-up)
DAYS = float(os.environ.get("CRYPTOBOT_SOAK_DAYS", "3"))
KILLS = int(os.environ.get("CRYPTOBOT_SOAK_KILLS", "20"))
SEEDS = int(os.environ.get("CRYPTOBOT_SOAK_SEEDS", "2"))
PATIENCE = 3                    # bars a runner with an armed crash point may run before the harness kills it itself
ORDER_POINTS = ("decision", "redeem", "intent", "send", "fill", "trade", "cancel")   # on the order path: rarer,
ORDER_PATIENCE = 8              # so a runner armed with one of them (at its 1st hit) gets more bars to reach it
QUIET_BARS = 3                  # the last bars run without faults or kills: the end state must be fully clean
BAR_TIMEOUT = 40.0              # seconds a candle may take (faults, restarts); longer is a hung runner
TIMEOUT_MS = 400                # the client's timeout: a `slow` reply (0.8 s) is a timeout
FEE = 0.1
SLIPPAGE = 0.05                 # the settings' default allowance (the emulator's default slippage)


# ----------------------------------------------------------------------------------------------- the full disk
class StateDisk:
    "A small loop-mounted ext4 for the state dir; `fill()` makes every new block allocation fail with ENOSPC."

    def __init__(self, root: Path, size_mb: int = 128):
        self.img, self.mnt = root / "state.img", root / "statefs"
        self.mnt.mkdir()
        with open(self.img, "wb") as f:
            f.truncate(size_mb << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(self.img)], check=True, capture_output=True)
        subprocess.run(["mount", "-o", "loop", str(self.img), str(self.mnt)], check=True, capture_output=True)
        self.ballast, self.full = self.mnt / "ballast", False

    def fill(self) -> None:
        fd = os.open(self.ballast, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            st = os.statvfs(self.mnt)
            size = max(0, st.f_bavail * st.f_frsize - (64 << 10))
            if size:
                os.posix_fallocate(fd, 0, size)
            for chunk in (1 << 20, 64 << 10, 4 << 10):           # then the last free blocks
                while True:
                    try:
                        os.posix_fallocate(fd, size, chunk)
                        size += chunk
                    except OSError as e:
                        assert e.errno == errno.ENOSPC, e
                        break
        finally:
            os.close(fd)
        probe = self.mnt / "probe"
        try:                                             # proof: a write on the state dir's file system fails
            with open(probe, "wb") as f:
                f.write(b"x" * 8192)
                f.flush()
                os.fsync(f.fileno())
            raise AssertionError("the state dir's file system still accepts writes after the ballast")
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
        finally:
            probe.unlink(missing_ok=True)
        self.full = True

    def free(self) -> None:
        self.ballast.unlink(missing_ok=True)
        self.full = False

    def close(self) -> None:
        self.free()
        subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True)
        self.img.unlink(missing_ok=True)


def state_disk(tmp: Path) -> StateDisk | None:
    if os.geteuid() != 0 or not shutil.which("mkfs.ext4"):
        return None
    try:
        return StateDisk(tmp)
    except (subprocess.CalledProcessError, OSError):
        return None


# ----------------------------------------------------------------------------------------------- faults
ENDPOINTS = [("order", "POST"), ("order", "POST"), ("order", "DELETE"), ("order", "GET"), ("openOrders", "GET"),
             ("myTrades", "GET"), ("account", "GET"), ("klines", "GET"), ("time", "GET"), (None, None)]


def arm_fault(emu, rng) -> tuple[str, object]:
    "One random fault on a random endpoint (or a partial fill of the next fill); (label, the armed Fault)."
    kind = rng.choice(["rate_limit", "ban", "server_error", "internal_error", "slow", "drop", "lost", "partial"])
    if kind == "partial":
        return "partial_fill", emu.faults.add("partial", fraction=rng.uniform(0.2, 0.8))
    endpoint, method = rng.choice(ENDPOINTS)
    opts = {}
    if kind == "server_error":
        opts = {"status": rng.choice([500, 502, 503, 504]), "execute": rng.random() < 0.5}
    elif kind == "slow":
        opts = {"delay": TIMEOUT_MS / 1000 * 2}
    elif kind in ("rate_limit", "ban"):
        opts = {"retry_after": 0}
    label = {"rate_limit": "429", "ban": "418", "internal_error": "-1001", "slow": "timeout", "drop": "dropped",
             "lost": "lost_response"}.get(kind) or f"{opts['status']}{'_executed' if opts.get('execute') else ''}"
    return label, emu.faults.add(kind, endpoint=endpoint, method=method, **opts)


# ----------------------------------------------------------------------------------------------- portfolio checks
def _ro(journal: Path) -> sqlite3.Connection:
    con = sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=5)
    con.row_factory = sqlite3.Row
    return con


def limit_sample(emu, journal: Path, orders) -> dict:
    "Open positions (exchange and journal) and the journal's total open planned risk as % of equity, right now."
    held = 0
    for sym in SYMS:
        pos, _, _ = held_from_fills(emu, sym, orders)
        tape = next(t for t in emu.tapes.values() if t.symbol == sym)
        price = float(emu._book.market_price(tape, "SELL", emu._now_ms()))
        held += float(pos) * price >= float(emu._book._filters(tape.id)["min_notional"])
    from cryptobot.journal import Journal
    j = Journal(journal, readonly=True)
    try:
        pos = j.open_positions()
        risk = sum(p["amount"] * max(0.0, p["entry_price"] - (j.intent(p["client_order_id"]) or {}).get("stop_price", 0.0))
                   for p in pos)
        eq = (j.select("SELECT equity FROM marks WHERE equity IS NOT NULL ORDER BY id DESC LIMIT 1")
              or [{"equity": 10_000.0}])[0]["equity"]
    finally:
        j.close()
    return {"held": held, "journal_open": len(pos), "risk_pct": risk / eq * 100}


def portfolio_problems(journal: Path, free_at: dict, samples: list[dict]) -> tuple[list[str], int]:
    """One entry per signal candle per symbol, the position and risk limits at every sample, cash never over-committed
    (the entries approved on one candle cost at most the quote that was free when it closed); (problems, candles with
    entries whose cash was checked)."""
    problems, checked = [], 0
    con = _ro(journal)
    try:
        # an approval a killed runner never redeemed is dead (its process held it); the restart asks again (with the
        # same client order id). What must be unique is an approval that was redeemed: it became the order.
        used = "approved = 1 AND side = 'buy' AND decision_id IN (SELECT approval_id FROM redemptions)"
        for r in con.execute(f"SELECT symbol, candle_time, COUNT(*) n FROM decisions WHERE {used} "
                             "GROUP BY symbol, candle_time HAVING n > 1"):
            problems.append(f"{r['n']} entries sent for {r['symbol']} on candle {r['candle_time']}")
        for r in con.execute("SELECT symbol, candle_time, COUNT(*) n FROM intents WHERE purpose = 'entry' "
                             "GROUP BY symbol, candle_time HAVING n > 1"):
            problems.append(f"{r['n']} entry intents for {r['symbol']} on candle {r['candle_time']}")
        for r in con.execute("SELECT client_order_id, raw_status FROM orders WHERE status = 'rejected' "
                             "AND raw_status != 'NOT_SENT'"):       # NOT_SENT: looked up, never reached the exchange
            problems.append(f"order {r['client_order_id']} refused by the exchange ({r['raw_status']})")
        spent = Counter()
        for r in con.execute(f"SELECT d.candle_time, d.plan, d.client_order_id, o.status, o.filled FROM decisions d "
                             f"LEFT JOIN orders o ON o.id = (SELECT MAX(id) FROM orders WHERE client_order_id = "
                             f"d.client_order_id) WHERE {used}"):
            final = r["status"] in ("closed", "canceled", "expired", "rejected")
            if final and not (r["filled"] or 0) > 0:
                continue                                  # ended unfilled (e.g. never sent): it spent nothing
            took = con.execute("SELECT SUM(price * amount) FROM fills WHERE client_order_id = ?",
                               (r["client_order_id"],)).fetchone()[0]   # a buy's fee is taken in the base
            # filled: what the exchange took; not back: its notional with the fee and the slippage allowance
            spent[round(r["candle_time"])] += took if final and took else \
                json.loads(r["plan"])["notional"] * (1 + FEE / 100) * (1 + SLIPPAGE / 100)
        for t, cash in spent.items():
            checked += t in free_at
            if t in free_at and cash > free_at[t] * (1 + 1e-9):
                problems.append(f"candle {t}: entries approved for {cash:.2f} USDT with {free_at[t]:.2f} free")
    finally:
        con.close()
    for s in samples:
        if s["held"] > LIMITS["max_open_positions"] or s["journal_open"] > LIMITS["max_open_positions"]:
            problems.append(f"bar {s['bar']}: {s['held']} positions held, {s['journal_open']} in the journal "
                            f"(limit {LIMITS['max_open_positions']})")
        if s["risk_pct"] > LIMITS["max_total_risk_pct"] * 1.05:          # fills may slip past the planned entry
            problems.append(f"bar {s['bar']}: open risk {s['risk_pct']:.3f}% > {LIMITS['max_total_risk_pct']}%")
    return problems, checked


# ----------------------------------------------------------------------------------------------- the harness
def make_market(n: int, folder: Path):
    from cryptobot.data import synthetic_candles
    from cryptobot.strategy import make_strategy, save_strategy_artifact
    candles = {sym: synthetic_candles(n=n, seed=seed, start_price=10_000.0 / div, price_decimals=dec)
               for (sym, div, dec), seed in zip((("BTC/USDT", 1, 2), ("ETH/USDT", 20, 2), ("SOL/USDT", 100, 3)),
                                                (7, 11, 13))}
    strat = ("ema_cross", {"fast": 3, "slow": 8})
    arts = {sym: str(save_strategy_artifact(make_strategy(*strat), folder / sym.replace("/", ""), symbol=sym,
                                            timeframe="1h").parent) for sym in SYMS}
    return candles, arts, strat


def runner_args(state: Path, emu, arts: dict, strat, logf: Path, **kw) -> dict:
    "What the fork server needs to start one portfolio runner (3 symbols, the limits, the short client timeout)."
    return dict(state=str(state), url=emu.base_url, key=KEY, secret=SECRET, model=arts, strategy=strat, log=str(logf),
                timeout_ms=TIMEOUT_MS, retry={"ban_pause": 0.2}, settings={"symbols": list(SYMS), **LIMITS}, **kw)


def all_done(journal: Path, close: int) -> bool:
    "Every symbol's runner journaled the candle closing at `close` as done."
    return all(close in done_candles(journal, s) for s in SYMS)


def unlock_all(state: Path, emu) -> int:
    "Lift the portfolio's and every symbol's kill switch (journaled, with a reason) while no runner runs; how many."
    from cryptobot.config import Settings
    from cryptobot.guardian import Guardian, symbol_locks
    from cryptobot.journal import Journal
    if not (state / "journal.sqlite").exists():
        return 0
    clock = lambda: emu.now.timestamp()                  # the exchange's time, as the runner's journal rows
    s = Settings(state_dir=state, symbols=SYMS, kill_switch_losses=10, **LIMITS)
    n = 0
    with Journal(state / "journal.sqlite", clock=clock) as j:
        g = Guardian(s, state, j, clock=clock)
        if g.current_state.locked:
            g.unlock("soak: the operator reviewed the losses", "soak")
            n += 1
        for sym, st in symbol_locks(j, s.kill_switch_losses).items():
            if st["locked"]:
                g.unlock_symbol(sym, "soak: the operator reviewed the losses", "soak")
                n += 1
    return n


def quiet(emu, journal: Path, settle: float = 0.3, limit: float = 10.0) -> None:
    "Wait until the emulator's book and the journal stop changing (the order queue has finished this candle)."
    def snap():
        try:
            con = _ro(journal)
            try:
                n = con.execute("SELECT MAX(id) FROM events").fetchone()[0]
            finally:
                con.close()
        except sqlite3.Error:
            n = None
        return emu.orders_created, len(emu.trades), n
    end, last, since = time.time() + limit, snap(), time.time()
    while time.time() < end:
        time.sleep(0.05)
        now = snap()
        if now != last:
            last, since = now, time.time()
        elif time.time() - since >= settle:
            return


def soak(tmp: Path, seed: int, days: float, kills: int, *, specs=None, patience: int = PATIENCE, chaos: bool = True,
         break_reconcile: bool = False) -> tuple[dict, list[str], str]:
    """Replay `days` of candles on 3 symbols with at least `kills` SIGKILLs; `chaos`: random faults and a full disk.
    (stats, invariant violations, the runners' log)."""
    from cryptobot.emulator import Emulator
    rng = random.Random(seed)
    bars_plan = int(days * 24)
    margin = kills * max(patience, ORDER_PATIENCE if specs is None else 0) + 20
    candles, arts, strat = make_market(START + bars_plan + margin, tmp / "art")
    emu = Emulator(candles, timeframe="1h", balances={"USDT": 10_000}, api_key=KEY, api_secret=SECRET,
                   clock="stepped", start=START, filters=OWN_FILTERS)
    assert not emu._book.unique_client_ids, "the soak must run on Binance's client-order-id rule"
    disk = state_disk(tmp) if chaos else None
    state = (disk.mnt if disk else tmp) / "state"
    journal, logf = state / "journal.sqlite", tmp / "runner.log"
    stats = {"seed": seed, "days": 0.0, "bars": 0, "kills": 0, "crash_point_kills": 0, "timed_kills": 0,
             "patience_kills": 0, "spawns": 0, "unavailable_exits": 0, "disk_full_exits": 0,
             "disk_full": "loop-mounted ext4, ENOSPC" if disk else "off" if not chaos else
                          "unavailable (needs root and mkfs.ext4)",
             "disk_full_episodes": 0, "restart_checks": 0, "unlocks": 0}
    armed, free_at, samples, violations, deferred = [], {}, [], [], {}
    armed_points = Counter()
    fs = ForkServer(tmp, env={"SOAK_PRELOAD_MODEL": "0"})
    emu.start()
    base = runner_args(state, emu, arts, strat, logf, break_reconcile=break_reconcile)
    t0, pid, spec, runner_bars, disk_in_life, fresh = time.time(), None, None, 0, False, False
    last = lambda: stats["bars"] >= bars_plan - QUIET_BARS

    def check(final: bool):
        "The invariants; an unprotected position only counts if it is still unprotected one candle later."
        quiet(emu, journal)
        for attempt in range(3):
            p = check_invariants(emu, state, SYMS)
            if not p:
                break
            time.sleep(1.0)
            quiet(emu, journal)
        hard = [x for x in p if "unprotected" not in x and "stops cover" not in x]
        soft = {x for x in p if x not in hard}
        if final:
            hard += sorted(soft)
        else:
            hard += sorted(soft & set(deferred))
            deferred.clear()
            deferred.update({x: stats["bars"] for x in soft})
        return hard

    try:
        while stats["bars"] < bars_plan or stats["kills"] < kills:
            if stats["bars"] + 2 >= bars_plan + margin:
                raise AssertionError(f"out of candles: {stats}")
            if pid is None and chaos and not (disk is not None and disk.full):
                stats["unlocks"] += unlock_all(state, emu)       # an operator reviews a kill-switch lock, lifts it
            if pid is None:
                spec, runner_bars, disk_in_life, fresh = None, 0, disk is not None and disk.full, True
                if stats["kills"] < kills and not last() and rng.random() < 0.6:
                    spec = rng.choice(specs) if specs else f"{rng.choice(ORDER_POINTS)}:1" if rng.random() < 0.5 \
                        else f"{rng.choice(CRASH_POINTS)}:{rng.randint(1, 3)}"
                pid = fs.spawn({**base, "crash": spec})
                stats["spawns"] += 1
                armed_points[spec.split(":")[0] if spec else "none"] += 1
            close, t_bar = round(emu.now.timestamp()), time.time()
            while not all_done(journal, close):
                if disk is not None and disk.full and time.time() - t_bar > 1.0:
                    disk.free()                                  # about a second of a full disk, then space again
                if not fs.alive(pid):
                    code = fs.exits[pid]
                    if code == -signal.SIGKILL:
                        stats["kills"] += 1
                        stats["crash_point_kills"] += 1
                    elif code == EX_UNAVAILABLE:                 # start-up hit a fault: fail closed, restarted
                        stats["unavailable_exits"] += 1
                    elif code == EX_IOERR and (disk_in_life or (disk is not None and disk.full)):
                        stats["disk_full_exits"] += 1            # a full disk: one fatal line, exit 74
                    else:
                        raise AssertionError(f"runner exited {code} (not a kill, not a full disk's 74): "
                                             f"{logf.read_text()[-4000:]}")
                    if disk is not None and disk.full:
                        disk.free()
                    pid = None
                    break
                if disk is not None and disk.full:
                    disk_in_life = True
                assert time.time() - t_bar < BAR_TIMEOUT, f"candle {close} not done in {BAR_TIMEOUT} s: " \
                    f"{stats}\n{logf.read_text()[-4000:]}"
                time.sleep(0.005)
            if pid is None:
                continue
            if fresh and stats["spawns"] > 1:                    # a restarted runner finished its first candle
                fresh = False
                stats["restart_checks"] += 1
                violations += [f"after restart {stats['spawns']} (bar {stats['bars']}): {x}" for x in check(False)]
                if violations:
                    break
            fresh = False
            orders = emu.orders
            samples.append({"bar": stats["bars"], **limit_sample(emu, journal, orders)})
            if chaos and not last():                             # faults for the next candle
                for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
                    if len(emu.faults.pending()) < 4:
                        armed.append(arm_fault(emu, rng))
            emu.advance(1)
            free_at[round(emu.now.timestamp())] = emu.balances["USDT"]["free"]
            stats["bars"] += 1
            runner_bars += 1
            if disk is not None and not last() and rng.random() < 0.04:
                disk.fill()                                      # the runner finds its disk full on this candle
                stats["disk_full_episodes"] += 1
            due = stats["kills"] < kills and not last()
            left = max(1, bars_plan - QUIET_BARS - stats["bars"])
            overdue = spec is not None and runner_bars >= (ORDER_PATIENCE if specs is None and spec.split(":")[0] in
                                                           ORDER_POINTS and spec.endswith(":1") else patience)
            if due and (overdue or (spec is None and rng.random() < min(1.0, 1.6 * (kills - stats["kills"]) / left))):
                time.sleep(rng.uniform(0.0, 0.08))               # SIGKILL at a random moment of the candle
                if fs.alive(pid):
                    os.kill(pid, signal.SIGKILL)
                    code = fs.wait(pid)
                    if code == -signal.SIGKILL:
                        stats["kills"] += 1
                        stats["timed_kills"] += 1
                        stats["patience_kills"] += overdue
                    else:                                        # it had just exited by itself: a full disk's 74
                        assert code == EX_IOERR and (disk_in_life or (disk is not None and disk.full)), \
                            (code, logf.read_text()[-4000:])
                        stats["disk_full_exits"] += 1
                    pid = None
        if not violations:                                       # a last clean runner, then a graceful SIGTERM
            if disk is not None:
                disk.free()
            if pid is not None and spec is not None:             # still armed: it could die in the clean phase
                os.kill(pid, signal.SIGKILL)
                code = fs.wait(pid)
                assert code in (-signal.SIGKILL, EX_IOERR), (code, logf.read_text()[-4000:])
                stats["kills" if code < 0 else "disk_full_exits"] += 1
                stats["timed_kills"] += code < 0
                pid = None
            started = lambda: logf.read_text().count("event=startup_reconciled") if logf.exists() else 0
            n_started = started() - (0 if pid is None else 1)
            if pid is None:
                pid = fs.spawn({**base, "crash": None})
                stats["spawns"] += 1
            close, end = round(emu.now.timestamp()), time.time() + 60
            while not all_done(journal, close) or started() <= n_started:
                assert time.time() < end and fs.alive(pid), logf.read_text()[-4000:]
                time.sleep(0.01)
            quiet(emu, journal)
            os.kill(pid, signal.SIGTERM)
            stats["sigterm_exit"] = fs.wait(pid, 60)
            pid = None
            violations += [f"at the end: {x}" for x in check(True)]
        pf, stats["cash_checked_candles"] = portfolio_problems(journal, free_at, samples)
        violations += pf
        stats["days"] = round(stats["bars"] / 24, 2)
        stats["orders"] = emu.orders_created
        stats["fills"] = len(emu.trades)
        from cryptobot.journal import Journal
        j = Journal(journal, readonly=True)
        try:
            stats["trades"] = len(j.trades())
            stats["trades_by_symbol"] = dict(Counter(t["symbol"] for t in j.trades()))
            stats["entries_denied"] = dict(Counter(r.split(" ")[0] for d in j.decisions(100_000) if not d["approved"]
                                                   for r in d["reasons"]))
        finally:
            j.close()
        fired = Counter()
        for label, f in armed:
            fired[label] += f.fired
        stats["faults_injected"] = dict(sorted(fired.items()))
        stats["faults_armed"] = len(armed)
        stats["max_open_positions"] = max([max(s["held"], s["journal_open"]) for s in samples] or [0])
        stats["max_open_risk_pct"] = round(max([s["risk_pct"] for s in samples] or [0.0]), 3)
        log = logf.read_text()
        stats["armed_points"] = dict(armed_points)
        stats["crash_points"] = {p: log.count(f"point={p} ") for p in CRASH_POINTS if f"point={p} " in log}
        stats["violations"] = len(violations)
        stats["seconds"] = round(time.time() - t0, 1)
        return stats, violations, log
    finally:
        if pid is not None and fs.alive(pid):
            os.kill(pid, signal.SIGKILL)
            fs.wait(pid)
        fs.close()
        emu.stop()
        if disk is not None:
            if violations or sys.exc_info()[0] is not None:   # keep the evidence off the loop mount
                shutil.copytree(state, tmp / "state_kept", dirs_exist_ok=True)
            disk.close()


@pytest.mark.parametrize("seed", range(1, SEEDS + 1))
def test_portfolio_soak_sigkills_faults_full_disk(tmp_path, seed):
    stats, violations, log = soak(tmp_path, seed, DAYS, KILLS)
    print(json.dumps(stats))
    assert violations == [], (stats, violations[:20])
    assert stats["kills"] >= KILLS and stats["bars"] >= int(DAYS * 24), stats
    assert stats["restart_checks"] >= KILLS // 2, f"too few restarts were checked: {stats}"
    assert stats["sigterm_exit"] == 0, "SIGTERM must finish the step, drain and exit 0"
    assert stats["orders"] >= 10 and stats["trades"] >= 3, f"too little trading to mean anything: {stats}"
    assert sum(stats["faults_injected"].values()) >= 5, stats
    assert stats["cash_checked_candles"] >= 1, f"no entry's cash was checked: {stats}"
    assert set(stats["crash_points"]) & set(ORDER_POINTS), f"no kill on the order path: {stats}"
    assert SECRET not in log and KEY not in log


def test_the_checks_catch_a_portfolio_runner_that_skips_reconciliation(tmp_path):
    "Negative control: killed right after sending its first order and restarted without reconciling, the runner leaves an order the journal does not know (or a position it does not know it holds)."
    stats, violations, _ = soak(tmp_path, 3, 2, 1, specs=["send:1"], patience=10_000, chaos=False,
                                break_reconcile=True)
    print(json.dumps(stats), violations)
    assert stats["crash_point_kills"] == 1 and stats["crash_points"] == {"send": 1}, stats
    assert any("never journaled" in v or "journal shows none" in v or "unprotected" in v for v in violations), violations


def test_a_full_state_disk_stops_the_runner_with_one_line_and_a_restart_recovers(tmp_path):
    """The state dir's file system full on a candle close: the runner cannot journal, so it stops with one
    `event=fatal` line and exit code 74 (it used to die with a traceback and exit 1); freed, a restart carries on."""
    from cryptobot.emulator import Emulator
    disk = state_disk(tmp_path)
    if disk is None:
        pytest.skip("a full disk needs a loop-mounted file system (root and mkfs.ext4)")
    candles, arts, strat = make_market(START + 40, tmp_path / "art")
    emu = Emulator(candles, timeframe="1h", balances={"USDT": 10_000}, api_key=KEY, api_secret=SECRET,
                   clock="stepped", start=START, filters=OWN_FILTERS)
    emu.start()
    fs = ForkServer(tmp_path, env={"SOAK_PRELOAD_MODEL": "0"})
    state, logf, pid = disk.mnt / "state", tmp_path / "runner.log", None
    journal, base = state / "journal.sqlite", runner_args(state, emu, arts, strat, logf, crash=None)

    def until_done(close):
        end = time.time() + 60
        while not all_done(journal, close):
            assert time.time() < end and fs.alive(pid), logf.read_text()[-3000:]
            time.sleep(0.01)
    try:
        pid = fs.spawn(base)
        until_done(round(emu.now.timestamp()))
        quiet(emu, journal)
        disk.fill()
        seen = len(logf.read_text())
        emu.advance(1)
        code = fs.wait(pid, 60)
        tail = logf.read_text()[seen:]
        assert code == EX_IOERR, (code, tail[-3000:])
        assert "Traceback" not in tail, tail[-3000:]
        fatal = [ln for ln in tail.splitlines() if "event=fatal" in ln]
        assert len(fatal) == 1 and "code=74" in fatal[0] and "is full" in fatal[0] and "free space there" in fatal[0], tail
        disk.free()
        pid = fs.spawn(base)                             # space again: the restart finishes the candle
        until_done(round(emu.now.timestamp()))
        quiet(emu, journal)
        assert check_invariants(emu, state, SYMS) == []
        os.kill(pid, signal.SIGTERM)
        assert fs.wait(pid, 60) == 0
        pid = None
    finally:
        if pid is not None and fs.alive(pid):
            os.kill(pid, signal.SIGKILL)
            fs.wait(pid)
        fs.close()
        emu.stop()
        disk.close()


def test_every_crash_point_fires_in_a_portfolio_runner(tmp_path):
    """The soak's kills at the journal's fault points (redeem, intent, fill, trade) must reach the journal the
    executors write: a portfolio runner's executors share the one journal, not the symbol's view of it (they used to
    be wrapped on the view, so those four points never fired in a portfolio and the soak never killed there)."""
    from cryptobot.config import Settings
    from cryptobot.emulator import Emulator
    from cryptobot.live import start_portfolio
    from cryptobot.strategy import make_strategy
    candles, arts, (name, params) = make_market(START + 120, tmp_path / "art")
    emu = Emulator(candles, timeframe="1h", balances={"USDT": 10_000}, api_key=KEY, api_secret=SECRET,
                   clock="stepped", start=START, filters=OWN_FILTERS)
    emu.start()
    s = Settings(state_dir=tmp_path / "state", exchange_url=emu.base_url, api_key=KEY, api_secret=SECRET,
                 symbols=SYMS, kill_switch_losses=10, **LIMITS)
    spec = ",".join(f"{p}:1" for p in CRASH_POINTS)
    hits = []
    try:
        pr = start_portfolio(s, "paper", arts, strategy=make_strategy(name, params), settle_s=0.0, poll_s=0.02,
                             min_poll_s=0.01, crash_at=spec, executor_kw={"settle_s": 0.0, "sleep": lambda _s: None},
                             retry={"retries": 3, "base_delay": 0.05, "max_delay": 0.2}, rate_limit_ms=1.0)
        for r in pr.runners:                             # record instead of SIGKILL
            r.crash.action = lambda point, sym=r.symbol: hits.append((sym, point))
        for k in range(100):
            if k:
                emu.advance(1)
            pr.step()
            pr.queue.drain(60)
            if {"redeem", "intent", "send", "fill", "trade"} <= {p for _, p in hits}:
                break
        pr.close()
        pr.journal.close()
    finally:
        emu.stop()
    points = {p for _, p in hits}
    assert {"redeem", "intent", "send", "fill", "trade", "decision"} <= points, sorted(hits)
