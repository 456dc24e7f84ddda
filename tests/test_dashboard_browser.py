"""The Voila monitor in a real browser: headless Debian Chromium driven by playwright's Python API.

Voila serves nbs/dashboard/monitor.ipynb on a state dir produced by the real Journal + Guardian code; the page must
show the key values, no secret, refresh by itself, and work on an empty state dir. Screenshots go to reports/.
Chromium: /usr/bin/chromium (Debian package; `make test` installs it when missing). Never `playwright install`.
"""
from __future__ import annotations

import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from cryptobot.config import Settings
from cryptobot.guardian import JOURNAL_FILE, Approval, Denial, Guardian, Signal
from cryptobot.journal import ClosedTrade, Journal
from cryptobot.monitor import MARK_EVENT, dashboard_notebook, start_dashboard

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
FAKE_SECRET = "cbFAKEsecret9Q7xZr2Lw8Vt4Nm6Kp1Hd3Jf5"
FAKE_KEY = "cbFAKEkey3Gh8Tr5Yu2Io9Pl4Kj7Mn1Bv6Cx0"
REPORTS = Path(__file__).resolve().parent.parent / "reports"
REFRESH_S = 5.0          # the notebook's default refresh interval

if not CHROMIUM.exists():
    pytest.fail("the browser test needs Debian's chromium at /usr/bin/chromium: run "
                "apt-get update && apt-get install -y --no-install-recommends chromium fonts-liberation",
                pytrace=False)
sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            yield b
        finally:
            b.close()


def serve(settings, tmp_path, env_extra=None):
    "Voila on the monitor notebook for `settings`; the fake API keys are deliberately left in its environment."
    env = dict(os.environ, BINANCE_API_KEY=FAKE_KEY, BINANCE_API_SECRET=FAKE_SECRET, **(env_extra or {}))
    for k in [k for k in env if k.startswith("CRYPTOBOT_")]:
        env.pop(k)
    return start_dashboard(settings, free_port(), env=env, scrub_secrets=False, log_path=tmp_path / "voila.log")


def open_page(browser, srv, timeout_ms=45_000):
    srv.wait_ready(30)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(srv.url, timeout=timeout_ms)
    page.wait_for_selector("#cbm-mode", timeout=timeout_ms)
    return page


def replay_state_dir(sd: Path, settings: Settings) -> dict:
    """A short paper replay on the local Binance emulator, through the real ccxt client, `BinanceExecutor`, `Guardian`
    and `Journal` — the runner's loop in miniature: a winning trade closed by the model, three stop-outs (the kill
    switch locks), an entry the Guardian denies, an operator unlock, then a position left open with its stop on the
    exchange. Per closed candle it journals what the live runner will: a Guardian mark (equity) and a `candle` event
    with the close (the monitor's mark price). Market time is laid out to end at the last full hour, so the page
    shows a fresh candle."""
    import numpy as np
    import pandas as pd

    from cryptobot.client import make_client
    from cryptobot.emulator import Emulator
    from cryptobot.exchange import BinanceExecutor
    from cryptobot.risk import RiskEngine

    key, secret, fp, start, K = "dash-emu-key", "dash-emu-secret", "f" * 64, 30, 14
    end = pd.Timestamp.now(tz="UTC").floor("1h")
    n = start + K + 8
    idx = pd.date_range(end - pd.Timedelta(hours=start + K), periods=n, freq="1h", tz="UTC", name="timestamp")
    p = np.round(60_000 * (1 + 0.002 * np.sin(np.arange(n) / 7)), 2)
    df = pd.DataFrame({"open": p, "high": p * 1.003, "low": p * 0.997, "close": p * 1.001,
                       "volume": np.full(n, 12.0)}, index=idx)
    df.attrs["source"] = "test"

    with Emulator(df, api_key=key, api_secret=secret, balances={"USDT": 10_000}, start=start) as emu:
        tape = next(iter(emu.tapes.values()))

        def shape(i, f_open=1.0, f_high=1.003, f_low=0.997, f_close=1.001):
            o = float(p[i])                                          # the quiet base price of bar i
            bar = (o * f_open, o * max(f_open, f_high, f_close) * 1.001, o * min(f_open, f_low, f_close) * 0.999,
                   o * f_close, 12.0)
            for k, v in zip(("open", "high", "low", "close", "volume"), bar):
                df.iloc[i, df.columns.get_loc(k)] = v
            tape.set_bar(i, *bar)

        clock = lambda: emu.now.timestamp() + 5.0                     # the runner polls just after a close
        j = Journal(sd / JOURNAL_FILE, clock=clock)
        g = Guardian(settings, sd, j, clock=clock)
        client = make_client(api_key=key, api_secret=secret, base_url=emu.base_url, timeout_ms=5_000)
        ex = BinanceExecutor(client, j, g, settings, sleep=lambda _s: None, settle_s=0.0)
        assert ex.reconcile().ok

        def equity(close):                  # from the emulator's book (a fetch_balance per bar would cost the
            b = emu.balances                # rate limiter's ~0.2 s each)
            tot = lambda a: float(b.get(a, {}).get("free", 0.0)) + float(b.get(a, {}).get("locked", 0.0))
            return tot("USDT") + tot("BTC") * close

        def mark():
            i = emu.bar - 1                                          # the candle that just closed
            ct, close = emu.now.timestamp(), float(df["close"].iloc[i])
            g.note_candle(ct, equity(close))
            j.log_event(MARK_EVENT, f"{settings.symbol} closed {close:g}",
                        {"symbol": settings.symbol, "candle_time": ct, "close": close})
            return close

        def step(n=1):
            for _ in range(n):
                emu.advance(1)
                ex.on_candle(df.iloc[emu.bar - 1])
                mark()

        def decide():
            ct, px = emu.now.timestamp(), float(df["close"].iloc[emu.bar - 1])
            ctx = ex.context(now=ct + 5, last_candle_close=ct, feature_fingerprint=fp, price=px)
            plan = RiskEngine.from_settings(settings).plan(px, ctx.equity, ctx.free_quote, ex.market)
            return g.approve(Signal(settings.symbol, "buy", ct, fp), plan, ctx)

        mark()
        b = emu.bar                                                  # 1. a win, closed by the model
        shape(b, 1.0, f_close=1.012)
        shape(b + 1, 1.012, f_close=1.022)
        shape(b + 2, 1.024, f_close=1.0)                             # back to the quiet level: no gap under the next stop
        a = decide()
        assert isinstance(a, Approval), a
        ex.enter(a)
        step(2)
        ex.exit(emu.now.timestamp(), "model")
        step(1)
        for _ in range(3):                                           # 2. three stop-outs: the kill switch locks
            b = emu.bar
            shape(b + 1, 1.0, f_low=0.97, f_close=0.975)
            a = decide()
            assert isinstance(a, Approval), a
            ex.enter(a)
            step(3)
        assert g.locked
        denial = decide()                                            # 3. the Guardian refuses while locked
        assert isinstance(denial, Denial)
        g.unlock("reviewed the three stop-outs of the replay", "operator")   # 4. an operator unlocks
        step(1)
        a = decide()                                                 # 5. a position that stays open, stop on the exchange
        assert isinstance(a, Approval), a
        res = ex.enter(a)
        shape(emu.bar, 1.0, f_close=1.004)
        step(1)
        assert emu.now == end, (emu.now, end)
        pos = ex.position()
        out = {"trades": j.trades(), "denial": str(denial), "open": {
            "client_order_id": pos.entry_cid, "entry_price": pos.entry_price, "stop_price": pos.stop_price,
            "amount": pos.open_amount, "stop_cid": res.stop_client_order_id}}
        j.close()
    return out


def screenshot(page, name):
    "Full page: Voila scrolls inside a container, so grow the viewport to the tallest element first."
    h = page.evaluate("() => { document.querySelectorAll('*').forEach(e => { e.scrollTop = 0; }); window.scrollTo(0, 0);"
                      " return document.querySelector('#cbm-footer').getBoundingClientRect().bottom; }")
    page.set_viewport_size({"width": 1280, "height": min(int(h) + 30, 4000)})
    REPORTS.mkdir(exist_ok=True)
    page.screenshot(path=str(REPORTS / name), full_page=True)
    page.set_viewport_size({"width": 1280, "height": 900})


def no_problem_text(page, srv):
    text, markup = page.inner_text("body"), page.content()
    log = srv.log_path.read_text(errors="replace")[-2000:] if srv.log_path and srv.log_path.exists() else ""
    for bad in ("Traceback", "There was an error when executing cell", "monitor error", "configuration error"):
        assert bad not in text, f"{bad!r} on the page; voila log tail: {log}"
    for secret in (FAKE_SECRET, FAKE_KEY):
        assert secret not in markup and secret not in text, "an API key reached the page"
    return text


def test_monitor_page_shows_state_refreshes_and_hides_secrets(browser, tmp_path):
    t_start = time.monotonic()
    sd, rd = tmp_path / "state", tmp_path / "reports"
    settings = Settings(state_dir=sd, reports_dir=rd, kill_switch_losses=3)
    now = time.time()
    ex = replay_state_dir(sd, settings)
    print(f"\nreplay on the emulator: {time.monotonic() - t_start:.1f} s")
    assert [(t["pnl"] > 0, t["exit_reason"]) for t in ex["trades"]] == [(True, "model")] + [(False, "stop")] * 3
    loss = [t for t in ex["trades"] if t["pnl"] < 0][0]
    win = [t for t in ex["trades"] if t["pnl"] > 0][0]
    rd.mkdir()
    day = datetime.now(timezone.utc).date().isoformat()
    (rd / f"audit-{day}.md").write_text("# Go-live readiness audit\n\n**Verdict:** FAIL — paper-only history; "
                                        "synthetic data is not evidence for mainnet\n")
    (rd / f"audit-{day}.html").write_text("<html><body><h1>Readiness audit</h1><p id='x'>domain table</p></body></html>")
    before = sorted(p.name for p in sd.iterdir())

    with serve(settings, tmp_path) as srv:
        page = open_page(browser, srv)
        page.wait_for_selector("svg.main-svg", timeout=30_000)          # plotly drew the equity chart
        text = no_problem_text(page, srv)
        assert page.inner_text("#cbm-mode") == "PAPER"
        assert page.locator("#cbm-portfolio").count() == 0 and page.locator("#cbm-symbols").count() == 0  # one symbol
        assert page.inner_text(".top .t") == "cryptobot monitor — BTC/USDT 1h"
        assert page.inner_text("#cbm-lock") == "unlocked" and page.inner_text("#cbm-losses") == "0"
        trades = page.inner_text("#cbm-trades")
        assert f"{loss['pnl']:+,.2f}" in trades and f"{win['pnl']:+,.2f}" in trades
        assert "kill_switch_locked" in page.inner_text("#cbm-denials")
        pos = page.inner_text("#cbm-position")
        assert f"{ex['open']['entry_price']:,.2f}" in pos and f"{ex['open']['stop_price']:,.2f}" in pos
        assert f"stop order: open ({ex['open']['stop_cid']})" in pos and "close of the last processed candle" in pos
        assert page.inner_text("#cbm-fresh") == "fresh"
        assert page.inner_text("#cbm-audit") == "FAIL" and "paper-only history" in text
        page.click("#cbm-audit-report summary")
        assert "domain table" in page.frame_locator("#cbm-audit-report iframe").locator("#x").inner_text(timeout=5000)
        page.click("#cbm-audit-report summary")
        screenshot(page, "dashboard-test.png")

        # the bot keeps running: its open position is stopped out, then two more losses -> the kill switch locks
        t_write = time.time()
        with Journal(sd / JOURNAL_FILE) as j:
            g = Guardian(settings, sd, j)
            o = ex["open"]
            stop_px = o["stop_price"]
            pnl1 = (stop_px - o["entry_price"]) * o["amount"] - 0.002 * stop_px * o["amount"]
            g.record_trade(ClosedTrade(trade_key=o["client_order_id"], symbol="BTC/USDT", entry_time=now - 3600,
                                       exit_time=now, entry_price=o["entry_price"], exit_price=stop_px,
                                       amount=o["amount"], fees=0.002 * stop_px * o["amount"], pnl=pnl1,
                                       exit_reason="stop"))
            for k, pnl in enumerate((-12.34, -5.67)):
                g.record_trade(ClosedTrade(trade_key=f"cbe-refresh-{k}", symbol="BTC/USDT", entry_time=now,
                                           exit_time=now + 1 + k, entry_price=60_000.0, exit_price=59_900.0,
                                           amount=0.01, fees=0.1, pnl=pnl, exit_reason="stop"))
            assert g.locked
        page.wait_for_function("document.querySelector('#cbm-lock') && "
                               "document.querySelector('#cbm-lock').innerText === 'LOCKED'",
                               timeout=int((3 * REFRESH_S + 5) * 1000))
        seen_after = time.time() - t_write
        assert page.inner_text("#cbm-losses") == "3"
        assert "3 consecutive losing trades" in page.inner_text("#cbm-lock-reason")
        page.wait_for_function("document.querySelector('#cbm-trades').innerText.includes('-5.67')",  # its own widget:
                               timeout=int((REFRESH_S + 5) * 1000))                                 # a message later
        assert "-12.34" in page.inner_text("#cbm-trades") and "-5.67" in page.inner_text("#cbm-trades")
        assert "flat" in page.inner_text("#cbm-position")
        no_problem_text(page, srv)
        screenshot(page, "dashboard-test-locked.png")
        page.close()
    assert srv.proc.poll() is not None, "voila still running after stop()"
    assert not [p for p in sd.iterdir() if p.name not in before and not p.name.startswith("journal.sqlite-")]
    print(f"\nmonitor page: refresh seen {seen_after:.1f} s after the write; test {time.monotonic() - t_start:.1f} s")


def test_monitor_page_on_empty_state_dir(browser, tmp_path):
    sd = tmp_path / "empty-state"
    sd.mkdir()
    settings = Settings(state_dir=sd, reports_dir=tmp_path / "no-reports")
    with serve(settings, tmp_path) as srv:
        page = open_page(browser, srv)
        page.wait_for_selector("#cbm-equity", timeout=20_000)
        text = no_problem_text(page, srv)
        assert page.inner_text("#cbm-trades") == "no trades yet"
        assert page.inner_text("#cbm-lock") == "not started" and page.inner_text("#cbm-audit") == "no audit yet"
        assert "flat" in page.inner_text("#cbm-position") and "no denials" in text
        assert page.inner_text("#cbm-fresh") == "none yet"
        screenshot(page, "dashboard-test-empty.png")
        page.close()
    assert list(sd.iterdir()) == [], "the monitor wrote to an empty state dir"


def test_markup_in_the_journal_shows_as_text_and_runs_nothing(browser, tmp_path):
    "A denial reason, a lock reason and an event's data carrying <script> / <img onerror>: shown literally, nothing runs."
    from test_dashboard import IMG, SCRIPT, hostile_state_dir
    sd = tmp_path / "state"
    settings = Settings(state_dir=sd, reports_dir=tmp_path / "no-reports")
    want = hostile_state_dir(sd, settings)
    dialogs = []
    with serve(settings, tmp_path) as srv:
        srv.wait_ready(30)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(srv.url, timeout=45_000)
        page.wait_for_selector("#cbm-denials", timeout=45_000)
        page.wait_for_selector("#cbm-footer", timeout=20_000)
        page.wait_for_timeout(1500)                     # an onerror would fire as the image fails to load
        no_problem_text(page, srv)
        assert page.inner_text("#cbm-lock") == "LOCKED"
        assert want["lock"] in page.inner_text("#cbm-lock-reason")         # after the state.json note
        denials = page.inner_text("#cbm-denials")
        assert all(r in denials for r in want["denial"]), denials
        body = page.inner_text("body")
        assert want["stop_result"] in body and want["reconciliation"] in body
        assert want["exit_reason"] in page.inner_text("#cbm-trades")
        injected = page.evaluate("""() => {
            const inCbm = sel => [...document.querySelectorAll(sel)].filter(e => e.closest('.cbm')).length;
            const on = [...document.querySelectorAll('.cbm *')].filter(e => [...e.attributes].some(a => a.name.startsWith('on'))).length;
            return {script: inCbm('script'), img: inCbm('img'), on: on, xsrc: document.querySelectorAll('img[src="x"]').length};
        }""")
        assert injected == {"script": 0, "img": 0, "on": 0, "xsrc": 0}, injected
        screenshot(page, "dashboard-test-markup.png")
        page.close()
    assert dialogs == [], f"a dialog fired: {dialogs}"


def test_notebook_is_the_one_served():
    nb = dashboard_notebook()
    assert nb.name == "monitor.ipynb" and nb.parent.name == "dashboard" and "launch(" in nb.read_text()


def test_monitor_page_shows_each_symbol_and_the_portfolio(browser, tmp_path):
    "A 3-symbol paper run on the emulator (tests/test_portfolio.py): the page shows the portfolio (open positions vs "
    "the limit, open risk vs its limit, the portfolio kill switch) and a row per symbol with its position and stop."
    from test_portfolio import SYMS, portfolio_state_dir
    s, seen = portfolio_state_dir(tmp_path)
    n_open = sum(1 for x in SYMS if seen[x]["amount"])
    with serve(s, tmp_path) as srv:
        page = open_page(browser, srv)
        page.wait_for_selector("#cbm-symbols", timeout=30_000)
        no_problem_text(page, srv)
        assert page.inner_text("#cbm-pf-positions") == f"{n_open} / 3"
        assert page.inner_text("#cbm-pf-risk") == f"{seen['_risk_pct']:.2f} %"
        assert page.inner_text("#cbm-pf-lock") == "unlocked"
        assert ", ".join(SYMS) in page.inner_text(".top .t")
        for x in SYMS:
            row = page.inner_text(f"#cbm-sym-{x.replace('/', '')}")
            assert row.startswith(x) and row.rstrip().endswith("unlocked") and seen[x]["signal"] in row, row
            if seen[x]["amount"]:
                assert f"{seen[x]['amount']:g} @ " in row and f"{float(seen[x]['stop']):,.2f} (open)" in row, row
            else:
                assert "flat" in row, row
        screenshot(page, "dashboard-test-portfolio.png")
        page.close()
