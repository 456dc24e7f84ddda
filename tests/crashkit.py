"""Shared pieces of the SIGKILL soaks (tests/test_live_crash.py: one symbol; tests/test_portfolio_soak.py: a
portfolio): a fork server that starts runner processes from a pre-imported interpreter, the journal probe the harness
waits on, and the invariant checks that must hold after any number of crashes."""
from __future__ import annotations

import json
import queue
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from decimal import ROUND_DOWN, Decimal
from pathlib import Path

from cryptobot.journal import fill_key

SERVER = textwrap.dedent(r'''
    import os, sys, json, select, traceback, resource
    os.environ["OMP_NUM_THREADS"] = "1"
    import cryptobot.live as L, cryptobot.exchange as X, cryptobot.client as C
    from cryptobot.config import Settings
    if os.environ.get("SOAK_PRELOAD_MODEL", "1") == "1":
        import cryptobot.model, joblib, sklearn.ensemble  # noqa: F401
    from cryptobot.strategy import make_strategy
    print("ready", flush=True)
    while True:
        r, _, _ = select.select([sys.stdin], [], [], 0.01)
        while True:
            try:
                pid, st = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            print(f"exit {pid} {os.waitstatus_to_exitcode(st)}", flush=True)
        if not r:
            continue
        line = sys.stdin.readline()
        if not line:
            break
        a = json.loads(line)
        pid = os.fork()
        if pid == 0:
            fd = os.open(a["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.dup2(fd, 1); os.dup2(fd, 2); os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            rc = 1
            try:
                if a.get("break_reconcile"):          # the negative control: a runner that skips reconciliation
                    def fake(self):
                        self.reconciled = True
                        return X.ReconcileReport(True)
                    X.Executor.reconcile = fake
                if a.get("timeout_ms"):               # the real client with a short timeout: a slow reply times out
                    make = C.make_client
                    def short(*args, **kw):
                        kw["timeout_ms"] = a["timeout_ms"]
                        return make(*args, **kw)
                    L.make_client = X.make_client = short
                retry = {"retries": 3, "base_delay": 0.05, "max_delay": 0.2, **a.get("retry", {})}
                common = dict(crash_at=a["crash"], settle_s=0.0, poll_s=0.01, min_poll_s=0.01, rate_limit_ms=1.0,
                              max_model_age_days=None, retry=retry,
                              executor_kw={"settle_s": 0.0, "sleep": lambda _s: None})
                s = Settings(state_dir=a["state"], exchange_url=a["url"], api_key=a["key"], api_secret=a["secret"],
                             kill_switch_losses=10, **{k: (tuple(v) if isinstance(v, list) else v)
                                                       for k, v in a.get("settings", {}).items()})
                if a.get("strategy"):                 # a portfolio of rule strategies: one artifact per symbol
                    name, params = a["strategy"]
                    rc = L.run(s, "paper", a["model"], strategy=make_strategy(name, params), **common)
                else:
                    rc = L.run(s, "paper", a["model"], **common)
            except BaseException:
                traceback.print_exc()
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(rc)
        print(f"child {pid}", flush=True)
''')


class ForkServer:
    "Runner processes forked from one pre-imported interpreter (a fork ~0.3 s instead of ~2 s of imports)."

    def __init__(self, tmp: Path, env: dict | None = None):
        script = tmp / "forkserver.py"
        script.write_text(SERVER)
        self.p = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, bufsize=1, cwd=str(Path(__file__).resolve().parents[1]),
                                  env=None if env is None else {**__import__("os").environ, **env})
        self.exits: dict[int, int] = {}
        self.spawned: queue.Queue = queue.Queue()
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        assert self.ready.wait(60), "fork server did not start"

    def _read(self):
        for line in self.p.stdout:
            w = line.split()
            if w[:1] == ["ready"]:
                self.ready.set()
            elif w[:1] == ["child"]:
                self.spawned.put(int(w[1]))
            elif w[:1] == ["exit"]:
                self.exits[int(w[1])] = int(w[2])

    def spawn(self, args: dict) -> int:
        self.p.stdin.write(json.dumps(args) + "\n")
        self.p.stdin.flush()
        return self.spawned.get(timeout=20)

    def alive(self, pid: int) -> bool:
        return pid not in self.exits

    def wait(self, pid: int, timeout: float = 20.0) -> int:
        end = time.time() + timeout
        while pid not in self.exits:
            assert time.time() < end, f"runner {pid} did not exit"
            time.sleep(0.005)
        return self.exits[pid]

    def close(self):
        self.p.stdin.close()
        self.p.wait(10)


def done_candles(journal: Path, symbol: str | None = None) -> set:
    "The newest candles the runner journaled as done (for `symbol`'s runner in a portfolio); empty if unreadable."
    if not journal.exists():
        return set()
    sql, args = "SELECT data FROM events WHERE kind = 'candle_done' ORDER BY id DESC LIMIT 5", ()
    if symbol is not None:
        sql, args = ("SELECT data FROM events WHERE kind = 'candle_done' AND json_extract(data, '$.symbol') = ? "
                     "ORDER BY id DESC LIMIT 5", (symbol,))
    try:
        con = sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=1)
        try:
            rows = con.execute(sql, args).fetchall()
        finally:
            con.close()
    except sqlite3.Error:
        return set()
    return {round(json.loads(r[0])["candle_time"]) for r in rows if r[0]}


# ------------------------------------------------------------------------------------------------------ invariants
_WANT = {"FILLED": "closed", "NEW": "open", "PARTIALLY_FILLED": "open", "CANCELED": "canceled", "EXPIRED": "expired"}


def book_problems(emu, j) -> list[str]:
    "No duplicate order, every emulator order journaled with its status, journal fills == emulator fills (every symbol)."
    problems = []
    orders = emu.orders
    cids = [o["client_order_id"] for o in orders]
    if len(set(cids)) != len(cids):
        problems.append("a client order id appears twice in the emulator's book")
    if emu.orders_created != len(orders):
        problems.append(f"orders_created {emu.orders_created} != {len(orders)} orders in the book")
    intents = {r["client_order_id"]: r for r in j.select("SELECT * FROM intents")}
    status = {r["client_order_id"]: r["status"] for r in j.select(
        "SELECT client_order_id, status FROM orders WHERE id IN (SELECT MAX(id) FROM orders GROUP BY client_order_id)")}
    for o in orders:
        cid = o["client_order_id"]
        if cid not in intents:
            problems.append(f"emulator order {cid} ({o['symbol']} {o['side']} {o['type']}) was never journaled")
        elif status.get(cid) != _WANT[o["status"]]:
            problems.append(f"{cid}: emulator {o['status']}, journal {status.get(cid)}")
    fills = {r["trade_id"] for r in j.select("SELECT trade_id FROM fills")}
    keys = {fill_key(t["symbol"].replace("/", ""), t["id"], t["orderId"], str(emu.uid)): t for t in emu.trades}
    lost = [t["id"] for k, t in keys.items() if k not in fills]
    if lost:
        problems.append(f"{len(lost)} emulator fills missing from the journal (trade ids {lost[:5]})")
    extra = fills - set(keys)
    if extra:
        problems.append(f"{len(extra)} journal fills the emulator never made ({sorted(extra)[:5]})")
    return problems


def held_from_fills(emu, symbol: str, orders=None) -> tuple[Decimal, Decimal, list[str]]:
    """(position, dust, problems) of `symbol` from the emulator's own fills. A position as the exchange layer defines
    it: a buy's quantity net of its base-asset commission, floored to the lot step; the floor remainders are dust
    nobody trades (worth less than the minimum notional). An entry while a position is open is a duplicate."""
    tape = next(t for t in emu.tapes.values() if t.symbol == symbol)
    f = emu._book._filters(tape.id)
    step, min_notional = Decimal(str(f["step_size"])), Decimal(str(f["min_notional"]))
    problems, pos_left, dust = [], Decimal(0), Decimal(0)
    for o in sorted(orders if orders is not None else emu.orders, key=lambda o: o["order_id"]):
        if o["symbol"] != symbol or o["executed_qty"] <= 0:
            continue
        qty = sum(Decimal(repr(x["qty"])) for x in o["fills"])
        if o["side"] == "BUY":
            if pos_left * Decimal(repr(o["fills"][0]["price"])) >= min_notional:
                problems.append(f"entry {o['client_order_id']} bought while a {pos_left} {tape.base} position was "
                                f"still open (a duplicate position)")
            net = qty - sum(Decimal(repr(x["commission"])) for x in o["fills"] if x["commissionAsset"] == tape.base)
            floored = (net / step).to_integral_value(ROUND_DOWN) * step
            dust += net - floored
            pos_left += floored
        else:
            pos_left -= qty
    return pos_left, dust, problems


def position_problems(emu, j, symbol: str, orders=None) -> list[str]:
    "`symbol`'s position on the exchange equals its own fills, is in the journal, and is covered by one stop."
    orders = orders if orders is not None else emu.orders
    tape = next(t for t in emu.tapes.values() if t.symbol == symbol)
    min_notional = float(emu._book._filters(tape.id)["min_notional"])
    pos_left, dust, problems = held_from_fills(emu, symbol, orders)
    bal = emu.balances.get(tape.base, {"free": 0.0, "locked": 0.0})
    if abs(bal["free"] + bal["locked"] - float(pos_left + dust)) > 1e-8:
        problems.append(f"emulator {tape.base} balance {bal['free'] + bal['locked']:g} != position {pos_left} + "
                        f"dust {dust} from its own fills")
    price = float(emu._book.market_price(tape, "SELL", emu._now_ms()))
    stops = [o for o in orders if o["symbol"] == symbol and o["status"] == "NEW" and o["type"] == "STOP_LOSS_LIMIT"]
    pos = [p for p in j.open_positions() if p.get("symbol", symbol) == symbol]
    held = float(pos_left)
    if held * price >= min_notional:                     # a position is open on the exchange
        if not stops:
            problems.append(f"the emulator holds a {held:g} {tape.base} position with no stop order (unprotected)")
        elif sum(o["qty"] for o in stops) + 1e-9 < held:
            problems.append(f"{symbol} stops cover {sum(o['qty'] for o in stops):g} of the {held:g} position")
        if not pos:
            problems.append(f"the emulator holds a {held:g} {tape.base} position but the journal shows none")
    elif pos:
        problems.append(f"the journal shows open position {pos[0]['client_order_id']} the emulator does not hold")
    if len(stops) > 1:
        problems.append(f"{len(stops)} {symbol} stop orders open at once")
    return problems


def guardian_problems(state_dir: Path, j) -> list[str]:
    "The Guardian's state.json equals the journal's rebuild (loss streak, lock, PnL)."
    from cryptobot.guardian import GuardianState, load_state
    problems = []
    st = load_state(Path(state_dir) / "state.json")
    rb = GuardianState.from_rebuild(j.rebuild_guardian_state(day=st.day), st.updated_at)
    if st.consecutive_losses != rb.consecutive_losses:
        problems.append(f"state.json loss streak {st.consecutive_losses} != journal {rb.consecutive_losses}")
    if st.locked != rb.locked:
        problems.append(f"state.json lock {st.locked} != journal {rb.locked}")
    if abs(st.total_pnl - rb.total_pnl) > 1e-6:
        problems.append(f"state.json pnl {st.total_pnl} != journal {rb.total_pnl}")
    return problems


def check_invariants(emu, state_dir: Path, symbols=("BTC/USDT",)) -> list[str]:
    "Everything that must hold after any number of crashes (empty list: all good)."
    from cryptobot.journal import Journal
    j = Journal(Path(state_dir) / "journal.sqlite", readonly=True)
    try:
        orders = emu.orders
        problems = book_problems(emu, j)
        for sym in symbols:
            problems += position_problems(emu, j, sym, orders)
        problems += guardian_problems(state_dir, j)
    finally:
        j.close()
    return problems
