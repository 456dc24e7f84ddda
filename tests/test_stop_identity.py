"""A stop is protection only if it is ours (issue 18, case 2): an order under the stop's client order id that is not the
stop the journal planned (price, type, side, quantity, limit) is replaced by the stop watch within one check and by the
start-up reconciliation, journaled as `stop_mismatch` naming the fields, alerted, and status does not call it protected
until a check finds ours. A foreign sell holding the coins the stop needs is cancelled before ours is placed again.
The real ccxt client and the real runner against the emulator on 127.0.0.1, real SQLite, a real webhook receiver."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from cryptobot.client import make_client
from cryptobot.config import Secret, Settings
from cryptobot.emulator import ORDER_TYPES, ORDER_TYPES_STOP_MARKET, Emulator
from cryptobot.live import format_stop, start_runner, stop_report
from market import frame
from runner_rig import KEY, SECRET, Rig, model  # noqa: F401 - `model` is a fixture
from test_notify import receiver  # noqa: F401 - `receiver` is a fixture

SYM = "BTC/USDT"
CHECK_S = 60
FAST = dict(timeout_s=0.5, attempts=2, backoff_s=0.05)


def _hand(emu):
    "Someone else with the account's key: the real ccxt client."
    c = make_client(api_key=KEY, api_secret=SECRET, base_url=emu.base_url)
    c.load_markets()
    return c


def _impostor(hand, cid, type_, side, amount, price=None, stop=None):
    "Cancel the bot's stop and place another order under the same client order id."
    hand.cancel_order(None, SYM, {"clientOrderId": cid})
    params = {"clientOrderId": cid, **({"stopLossPrice": stop} if stop is not None else {})}
    return hand.create_order(SYM, type_, side, amount, price, params)


def _mismatches(journal):
    return [(e["message"], e["data"]) for e in journal.last_events(50, kind="stop_mismatch")]


def _alerts(receiver, word):
    return [b for _, b in receiver.got if word in b["title"]]


def _g(x):
    return f"{float(x):.12g}"


# ---------------------------------------------------------------------------- the case on the running runner
@pytest.mark.exclusive          # times the code: no other test runs meanwhile (conftest.py)
def test_wrong_price_under_our_client_id_is_replaced_by_the_watch_within_one_check(tmp_path, model, receiver):
    "The bot's STOP_LOSS cancelled, a STOP_LOSS_LIMIT at stopPrice 101 placed under its id: replaced at the next check."
    r = Rig(tmp_path, model, stop_market=True, notify_kw=FAST,
            settings={"stop_check_s": CHECK_S, "notify_urls": Secret(receiver.url("/ok/hook"))})
    try:
        st = r.wait_for(r.stop_order, "the stop after the entry")
        cid, S, qty = st["client_order_id"], float(st["stop_price"]), float(st["qty"])
        imp = _impostor(_hand(r.emu), cid, "limit", "sell", qty, price=100.0, stop=101.0)
        placed = r.emu.order(order_id=int(imp["id"]))["time"] / 1000.0          # exchange time
        mm = r.wait_for(lambda: r.events("stop_mismatch"), "the stop_mismatch event", 60)
        unp = r.wait_for(lambda: [e for e in r.events("unprotected") if e[3]["cause"] == "stop_mismatch"],
                         "the replacement", 60)
        got = r.wait_for(lambda: _alerts(receiver, "Stop MISMATCH"), "the stop_mismatch alert", 30)
        r.wait_for(lambda: [e for e in r.events("stop_check") if e[3]["result"] == "protected" and
                            e[3]["stop"] == unp[0][3]["stop"]], "a check that finds ours", 60)
    finally:
        r.close()
    want = f"stop BTC/USDT: type STOP_LOSS_LIMIT != planned STOP_LOSS; stopPrice 101 != planned {_g(S)}; " \
           f"price 100 != planned none"
    assert mm[0][2] == want, mm[0][2]
    assert mm[0][3]["action"] == "replaced" and mm[0][3]["stop"] == cid and mm[0][3]["symbol"] == SYM
    assert r.emu.order(order_id=int(imp["id"]))["status"] == "CANCELED"            # the impostor is gone
    d = unp[0][3]
    new = r.emu.order(client_order_id=d["stop"])
    assert d["stop"] != cid and new["status"] == "NEW" and new["type"] == "STOP_LOSS"   # ours, fresh id
    assert float(new["stop_price"]) == S and float(new["qty"]) == qty
    assert abs(d["start"] - placed) < 1e-6                          # unprotected from the impostor's placement
    print(f"impostor placed -> our stop again {new['time'] / 1000.0 - placed:.1f} s of exchange time "
          f"(check every {CHECK_S} s)")
    assert new["time"] / 1000.0 - placed <= CHECK_S * 1.5
    results = [e[3]["result"] for e in r.events("stop_check") if e[0] >= mm[0][0]]
    assert results[0] == "stop_replaced" and "protected" in results      # the check that found it did not say protected
    assert got[0]["title"] == "cryptobot: Stop MISMATCH BTC/USDT" and got[0]["type"] == "failure"
    assert want in got[0]["message"]


# ------------------------------------------------------------- the same, a step at a time (stepped exchange clock)
class Stepped:
    "A stepped emulator and `start_runner` driven by hand: `step()` enters, `check()` is one stop check at +60 s."

    def __init__(self, tmp, model, url, *, stop_market=True):
        self.emu = Emulator(frame(1_300), clock="stepped", start=1_100, api_key=KEY, api_secret=SECRET,
                            order_types=ORDER_TYPES_STOP_MARKET if stop_market else ORDER_TYPES).start()
        self.model = model
        self.s = Settings(state_dir=tmp / "st", exchange_url=self.emu.base_url, api_key=KEY, api_secret=SECRET,
                          stop_check_s=CHECK_S, notify_urls=Secret(url))
        self.r = self.start()
        assert self.r.step().outcome == "entered"
        self.hand = _hand(self.emu)

    def start(self):
        from cryptobot.model import ThresholdPolicy
        return start_runner(self.s, "paper", self.model, strategy=ThresholdPolicy(0.0, 0.0, 1000), max_model_age_days=None,
                            rate_limit_ms=1.0, notify_kw=FAST,
                            executor_kw={"settle_s": 0.0, "sleep": lambda _s: None, "retry": {"retries": 1}})

    @property
    def pos(self):
        return self.r.executor.position()

    def check(self):
        self.emu.set_time(self.emu.now + pd.Timedelta(seconds=CHECK_S))
        self.r.clock.sync()
        what = self.r.check_stop()
        self.r._alert_poll()
        return what

    def restart(self, between=None):
        self.r.close()
        self.r.journal.close()
        if between is not None:
            between()
        self.r = self.start()

    def report(self):
        return stop_report(self.s.state_dir / "journal.sqlite", now=self.r.clock())

    def close(self):
        try:
            self.r.close()
            self.r.journal.close()
        finally:
            self.emu.stop()


@pytest.fixture
def stepped(tmp_path, model, receiver):
    made = []

    def make(**kw):
        made.append(Stepped(tmp_path / f"s{len(made)}", model, receiver.url("/ok/hook"), **kw))
        return made[-1]
    yield make
    for m in made:
        m.close()


def test_wrong_price_under_our_client_id_is_replaced_at_restart(stepped, receiver):
    "The same stop swap while the runner is down: the start-up reconciliation replaces it and is NOT ok; status says "
    "stop_mismatch, not protected, until the first check finds ours."
    t = stepped()
    p = t.pos
    assert t.check() == "protected"
    t.restart(between=lambda: _impostor(t.hand, p.stop_cid, "limit", "sell", p.open_amount, price=100.0, stop=101.0))
    want = f"stop BTC/USDT: type STOP_LOSS_LIMIT != planned STOP_LOSS; stopPrice 101 != planned {_g(p.stop_price)}; " \
           f"price 100 != planned none"
    assert [m for m, _ in _mismatches(t.r.journal)] == [want]
    rec = t.r.journal.select("SELECT ok, summary FROM reconciliations ORDER BY id DESC LIMIT 1")[0]
    assert rec["ok"] == 0 and want in rec["summary"], rec
    assert t.r.executor.reconciled is False                      # entries wait for a reconciliation that finds ours
    new = t.pos.stop_cid
    assert new != p.stop_cid and t.emu.order(client_order_id=new)["status"] == "NEW"
    assert t.emu.order(client_order_id=new)["type"] == "STOP_LOSS"
    assert float(t.emu.order(client_order_id=new)["stop_price"]) == p.stop_price
    rep = t.report()
    assert rep["last_result"] == "stop_mismatch" and rep["mismatch"] == want       # not "protected"
    line = format_stop(rep)
    assert "STOP MISMATCH, not protected until a stop check confirms ours: " + want in line, line
    assert "protected" not in line.replace("not protected", ""), line
    from cryptobot.monitor import snapshot, status_html
    html = status_html(snapshot(t.s, now=t.r.clock()))
    assert "stop_mismatch · NOT protected until a check confirms ours: " + want in html
    t.r._alert_poll()
    t.r.notifier.flush(10)
    got = _alerts(receiver, "Stop MISMATCH")
    assert got and want in got[0]["message"]
    assert t.check() == "protected"                               # ours, confirmed by the watch
    rep = t.report()
    assert rep["last_result"] == "protected" and rep["mismatch"] is None
    assert t.r.executor.reconciled is True                        # the sync's reconciliation found ours: ok again
    assert t.r.journal.select("SELECT ok FROM reconciliations ORDER BY id DESC LIMIT 1")[0]["ok"] == 1


# ------------------------------------------------------------------------------------------- the class of the case
def test_smaller_quantity_under_our_client_id_is_replaced(stepped):
    t = stepped()
    p = t.pos
    half = round(p.open_amount / 2, 5)
    _impostor(t.hand, p.stop_cid, "market", "sell", half, stop=p.stop_price)
    assert t.check() == "stop_replaced"
    (msg, d), = _mismatches(t.r.journal)
    assert msg == (f"stop BTC/USDT: amount {_g(half)} != planned {_g(p.open_amount)}; "
                   f"remaining {_g(half)} != position {_g(p.open_amount)}"), msg
    new = t.emu.order(client_order_id=t.pos.stop_cid)
    assert float(new["qty"]) == p.open_amount and new["status"] == "NEW"
    assert t.check() == "protected"


def test_stop_on_the_wrong_side_is_replaced(stepped):
    "A BUY stop under our id protects nothing."
    t = stepped()
    p = t.pos
    above = round(p.entry_price * 1.05, 2)
    _impostor(t.hand, p.stop_cid, "market", "buy", 0.001, stop=above)
    assert t.check() == "stop_replaced"
    (msg, d), = _mismatches(t.r.journal)
    assert msg.startswith("stop BTC/USDT: side buy != planned sell") and f"stopPrice {_g(above)}" in msg, msg
    new = t.emu.order(client_order_id=t.pos.stop_cid)
    assert new["side"] == "SELL" and new["status"] == "NEW" and float(new["stop_price"]) == p.stop_price
    assert t.check() == "protected"


def test_stop_limit_with_its_limit_far_below_the_plan_is_replaced(stepped):
    "Our STOP_LOSS_LIMIT's trigger, but a limit half the price: it would sell at any price. Replaced."
    t = stepped(stop_market=False)
    p = t.pos
    low = round(p.stop_limit_price * 0.5, 2)
    _impostor(t.hand, p.stop_cid, "limit", "sell", p.open_amount, price=low, stop=p.stop_price)
    assert t.check() == "stop_replaced"
    (msg, d), = _mismatches(t.r.journal)
    assert msg == f"stop BTC/USDT: price {_g(low)} != planned {_g(p.stop_limit_price)}", msg
    new = t.emu.order(client_order_id=t.pos.stop_cid)
    assert new["type"] == "STOP_LOSS_LIMIT" and float(new["price"]) == p.stop_limit_price
    assert t.check() == "protected"


def test_a_foreign_sell_holding_the_coins_is_cancelled_and_ours_placed(stepped, receiver):
    "Our stop cancelled, a foreign limit sell of the whole position placed: it holds the coins the stop needs."
    t = stepped()
    p = t.pos
    t.hand.cancel_order(None, SYM, {"clientOrderId": p.stop_cid})
    far = round(p.entry_price * 2, 2)
    foreign = t.hand.create_order(SYM, "limit", "sell", p.open_amount, far, {"clientOrderId": "by-hand-tp"})
    assert t.check() == "stop_placed"
    assert t.emu.order(client_order_id="by-hand-tp")["status"] == "CANCELED"
    (msg, d), = _mismatches(t.r.journal)
    assert msg.startswith(f"stop BTC/USDT: sell order by-hand-tp (LIMIT {_g(p.open_amount)}) holds the coins the "
                          f"stop needs (free ") and msg.endswith(f" < {_g(p.open_amount)}); cancelled"), msg
    assert d["action"] == "cancelled" and d["order_id"] == str(foreign["id"])
    new = t.emu.order(client_order_id=t.pos.stop_cid)
    assert new["status"] == "NEW" and float(new["qty"]) == p.open_amount
    assert t.r.journal.last_events(1, kind="stop_rejected") == []
    assert t.r.journal.select("SELECT COUNT(*) AS n FROM intents WHERE purpose = 'emergency_exit'")[0]["n"] == 0
    t.r.notifier.flush(10)
    assert _alerts(receiver, "Stop MISMATCH")
    assert t.check() == "protected"


def test_a_foreign_sell_that_leaves_the_coins_free_is_left_alone(stepped):
    "A sell order on coins the position does not need (bought by hand beside it) is not ours to cancel."
    t = stepped()
    p = t.pos
    t.hand.create_order(SYM, "market", "buy", 0.001)
    t.hand.create_order(SYM, "limit", "sell", 0.001, round(p.entry_price * 2, 2), {"clientOrderId": "by-hand-own"})
    t.hand.cancel_order(None, SYM, {"clientOrderId": p.stop_cid})            # ours gone: placed again
    assert t.check() == "stop_placed"
    assert t.emu.order(client_order_id="by-hand-own")["status"] == "NEW"
    assert _mismatches(t.r.journal) == []


def test_replacements_are_bounded_then_the_position_is_sold(stepped):
    "A stop that keeps being swapped is no protection: after `max_stop_replacements` the position is sold out."
    t = stepped()
    t.r.executor.max_stop_replacements = 1
    p = t.pos
    _impostor(t.hand, p.stop_cid, "market", "sell", p.open_amount, stop=101.0)
    assert t.check() == "stop_replaced"
    _impostor(t.hand, t.pos.stop_cid, "market", "sell", p.open_amount, stop=102.0)
    assert t.check() == "emergency_exit"
    acts = [d["action"] for _, d in _mismatches(t.r.journal)]
    assert acts == ["replaced", "sold_out"]
    assert t.pos is None
    (tr,) = t.r.journal.trades()
    assert tr["exit_reason"] == "stop_mismatch"
    assert [o for o in t.emu.orders if o["status"] == "NEW"] == []            # nothing left open, no loop of orders


# ------------------------------------------------------------------------------------- a portfolio, the same rules
def test_portfolio_replaces_a_swapped_stop_and_alerts_under_its_symbol(receiver, tmp_path):
    "CRYPTOBOT_SYMBOLS: a symbol's stop swapped for one with half the stop and limit price is replaced by the watch "
    "and by a reconciliation, journaled and alerted under that symbol; status says stop_mismatch until a check."
    from test_portfolio import _alerting_portfolio
    emu, s, pr = _alerting_portfolio(tmp_path, receiver.url("/ok/pf"), hand_order=False)
    j = pr.journal
    try:
        held = []
        for k in range(300):
            if k:
                emu.advance(1)
            pr.step()
            held = [r for r in pr.runners if r.executor.position() is not None and r.executor.position().stop_cid]
            if held:
                break
        assert held, "no position in 300 candles"
        r = held[-1]
        sym, hand = r.symbol, make_client(api_key="portfolio-key-0001", api_secret="portfolio-secret-0001",
                                          base_url=emu.base_url)
        hand.load_markets()

        def swap():
            p = r.executor.position()
            half_stop = float(hand.price_to_precision(sym, p.stop_price / 2))
            half_limit = float(hand.price_to_precision(sym, p.stop_limit_price / 2))
            hand.cancel_order(None, sym, {"clientOrderId": p.stop_cid})
            hand.create_order(sym, "limit", "sell", p.open_amount, half_limit,
                              {"stopLossPrice": half_stop, "clientOrderId": p.stop_cid})
            return p, f"stop {sym}: stopPrice {_g(half_stop)} != planned {_g(p.stop_price)}; " \
                      f"price {_g(half_limit)} != planned {_g(p.stop_limit_price)}"

        p, want = swap()
        assert r.check_stop() == "stop_replaced"
        pr._alert_poll(r)
        assert [m for m, _ in _mismatches(j)] == [want]
        assert _mismatches(j)[0][1]["symbol"] == sym
        new = r.executor.position().stop_cid
        assert new != p.stop_cid and emu.order(client_order_id=new)["status"] == "NEW"
        assert float(emu.order(client_order_id=new)["stop_price"]) == p.stop_price
        assert r.check_stop() == "protected"
        p2, want2 = swap()                                  # the same again, found by a reconciliation this time
        rep = r.executor.reconcile()
        assert not rep.ok and want2 in rep.problems, rep
        pr._alert_poll(r)
        sr = stop_report(s.state_dir / "journal.sqlite")
        assert (sr["last_result"], sr["mismatch"]) == ("stop_mismatch", want2)
        assert r.check_stop() == "protected"
        assert stop_report(s.state_dir / "journal.sqlite")["mismatch"] is None
        assert pr.notifier.flush(30)
    finally:
        pr.close()
        j.close()
        emu.stop()
    titles = [b["title"] for _, b in receiver.got if "Stop MISMATCH" in b["title"]]
    assert titles and set(titles) == {f"cryptobot: Stop MISMATCH {sym}"}, titles
    assert want in [b["message"] for _, b in receiver.got if "Stop MISMATCH" in b["title"]][0]
