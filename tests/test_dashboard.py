"""`serve_dashboard` / `start_dashboard`: the real Voila process, loopback only, no API keys in its environment,
a busy port is an error, Ctrl-C stops Voila and its kernels. (The page itself: test_dashboard_browser.py.)"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cryptobot.config import Settings
from cryptobot.monitor import MonitorError, serve_dashboard, start_dashboard, voila_command


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "dashboard.example.com"])
def test_non_loopback_host_refused_before_anything_starts(host, tmp_path):
    with pytest.raises(MonitorError, match="refusing to serve the dashboard"):
        serve_dashboard(tmp_path, port=free_port(), host=host, settings=Settings(state_dir=tmp_path))


def test_loopback_hosts_accepted():
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert f"--Voila.ip={host}" in voila_command("nb.ipynb", 8866, host)


def test_child_environment_has_no_api_keys_and_the_resolved_state_dir(tmp_path):
    sd = tmp_path / "state"
    env = dict(os.environ, BINANCE_API_KEY="cbFAKEkeyAAAA1111", BINANCE_API_SECRET="cbFAKEsecretBBBB2222")
    srv = start_dashboard(Settings(state_dir=sd, reports_dir=tmp_path / "r", testnet=True), free_port(), env=env,
                          log_path=tmp_path / "voila.log")
    try:
        srv.wait_ready(30)
        raw = Path(f"/proc/{srv.proc.pid}/environ").read_bytes().split(b"\0")
        child = dict(kv.decode().split("=", 1) for kv in raw if b"=" in kv)
        assert "BINANCE_API_KEY" not in child and "BINANCE_API_SECRET" not in child
        assert child["CRYPTOBOT_STATE_DIR"] == str(sd.resolve()) and child["BINANCE_TESTNET"] == "true"
        assert child["GO_LIVE"] == "false"
    finally:
        srv.stop()
    assert srv.proc.poll() is not None and not sd.exists()


def test_busy_port_is_an_error_not_a_silent_move(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        srv = start_dashboard(Settings(state_dir=tmp_path), port, log_path=tmp_path / "voila.log")
        try:
            with pytest.raises(MonitorError, match="voila exited"):
                srv.wait_ready(30)
        finally:
            srv.stop()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_dashboard_serves_the_monitor_and_stops_on_a_signal(tmp_path, sig):
    "The real entry point `cryptobot dashboard` calls, in a child process: page served; Ctrl-C / SIGTERM exit 0, Voila gone."
    port, sd = free_port(), tmp_path / "state"
    sd.mkdir()
    code = (f"import sys; from cryptobot.config import Settings; from cryptobot.monitor import serve_dashboard; "
            f"sys.exit(serve_dashboard({str(sd)!r}, port={port}, settings=Settings(reports_dir={str(tmp_path)!r})))")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        seen = []
        for line in p.stdout:                      # voila's own log lines come first, on the same stream
            seen.append(line)
            if line.startswith("dashboard:") or len(seen) > 200:
                break
        assert line.startswith(f"dashboard: http://127.0.0.1:{port}/"), "".join(seen[-20:])
        assert str(sd.resolve()) in line
        t0 = time.monotonic()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=60) as r:   # runs the notebook in a kernel
            body = r.read().decode()
        assert r.status == 200 and "Traceback" not in body
        print(f"\nGET / (kernel start + notebook run) {time.monotonic() - t0:.1f} s")
        p.send_signal(sig)
        assert p.wait(20) == 0
        deadline = time.monotonic() + 10
        while port_open(port) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not port_open(port), "voila still listening after Ctrl-C"
        assert list(sd.iterdir()) == []
    finally:
        if p.poll() is None:                       # let serve_dashboard stop its Voila (own process group) first
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)


@pytest.mark.parametrize("damage", ["journal_deleted", "journal_corrupt", "streak_lowered_by_hand"])
def test_page_says_locked_where_the_runner_refuses(tmp_path, damage):
    "The dashboard's kill-switch card comes from the same entry gate as `cryptobot status` and the runner's Guardian."
    import json
    from cryptobot.guardian import Guardian, entry_gate
    from cryptobot.journal import ClosedTrade, Journal, JournalError
    from cryptobot.monitor import snapshot, status_html
    s = Settings(state_dir=tmp_path)
    t0 = time.time() - 7200
    with Journal(tmp_path / "journal.sqlite") as j:
        g = Guardian(s, tmp_path, j)
        for i in range(2):
            g.record_trade(ClosedTrade(f"t{i}", "BTC/USDT", t0 + i, t0 + 60 + i, 100.0, 98.0, 1.0, 0.2, -2.2, "stop"))
        g.note_candle(time.time() - 60, 10_000.0)
    if damage == "journal_deleted":
        for p in tmp_path.glob("journal.sqlite*"):
            p.unlink()
    elif damage == "journal_corrupt":
        (tmp_path / "journal.sqlite").write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    else:
        st = json.loads((tmp_path / "state.json").read_text())
        st["consecutive_losses"] = 0
        (tmp_path / "state.json").write_text(json.dumps(st))
    files = sorted(p.name for p in tmp_path.iterdir())
    snap = snapshot(s)
    html = status_html(snap)
    assert sorted(p.name for p in tmp_path.iterdir()) == files                 # the page wrote nothing
    assert '<span id="cbm-lock">LOCKED</span>' in html and "entries allowed" not in html, html[:2000]
    reason = snap["status"]["lock_reason"]
    assert reason == "; ".join(entry_gate(tmp_path).reasons) and reason
    try:                                                                       # what the runner decides
        with Journal(tmp_path / "journal.sqlite") as j:
            assert Guardian(s, tmp_path, j).locked
    except JournalError as e:
        assert str(e) == reason


# --- journal text is data, never markup (issue 10) ---------------------------------------------------------------------
SCRIPT, IMG = "<script>alert(1)</script>", "<img src=x onerror=alert(2)>"
ALLOWED_TAGS = {"style", "div", "span", "b", "br", "h2", "table", "tr", "th", "td", "details", "summary", "iframe"}


def hostile_state_dir(sd: Path, settings: Settings) -> dict:
    """A state dir written through the real Journal whose text fields carry markup: a Guardian denial's reasons, a
    kill-switch lock's reason, a stop-check event's message and result, a failed reconciliation's summary and a
    trade's exit reason. Returns the strings the page must show literally."""
    from cryptobot.guardian import JOURNAL_FILE
    from cryptobot.journal import ClosedTrade, Journal
    now = time.time()
    sd.mkdir(parents=True, exist_ok=True)
    with Journal(sd / JOURNAL_FILE) as j:
        j.record_trade(ClosedTrade("cbe-hostile-1", settings.symbol, now - 7200, now - 3600, 100.0, 99.0, 1.0, 0.2,
                                   -1.2, f"stop {IMG}"))
        j.record_decision("d-hostile-1", False, [f"kill_switch_locked {SCRIPT}", IMG], symbol=settings.symbol,
                          side="buy", candle_time=now - 3600, mode=settings.mode)
        j.record_lock(f"operator lock {SCRIPT} {IMG}")
        j.log_event("stop_check", f"stop checked {SCRIPT}", {"t": now - 30, "result": f"ok {IMG}", "interval_s": 60})
        j.record_reconciliation(False, f"balance differs {SCRIPT}")
    return {"denial": [f"kill_switch_locked {SCRIPT}", IMG], "lock": f"operator lock {SCRIPT} {IMG}",
            "stop_result": f"ok {IMG}", "reconciliation": f"balance differs {SCRIPT}", "exit_reason": f"stop {IMG}"}


class _Page(__import__("html.parser").parser.HTMLParser):
    "Tags, attributes and text as a browser's parser sees them (srcdoc frames aside)."

    def __init__(self, markup):
        super().__init__(convert_charrefs=True)
        self.tags, self.attrs, self.text = [], [], []
        self.feed(markup)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [k for k, _ in attrs]

    def handle_data(self, data):
        self.text.append(data)


def test_journal_markup_is_shown_as_text_not_run(tmp_path):
    "Every part of the page, rendered from a state dir full of markup: only the monitor's own tags, the text literal."
    from cryptobot.monitor import audit_html, position_html, snapshot, status_html, tables_html
    s = Settings(state_dir=tmp_path / "state", reports_dir=tmp_path / "reports")
    want = hostile_state_dir(tmp_path / "state", s)
    snap = snapshot(s)
    assert snap["status"]["locked"] and snap["denials"], snap["problems"]
    markup = status_html(snap) + position_html(snap) + tables_html(snap) + audit_html(snap["audit"])
    page = _Page(markup)
    assert set(page.tags) <= ALLOWED_TAGS, set(page.tags) - ALLOWED_TAGS
    assert not [a for a in page.attrs if a.lower().startswith("on")], page.attrs
    text = "".join(page.text)
    for s_ in [*want["denial"], want["lock"], want["stop_result"], want["reconciliation"], want["exit_reason"]]:
        assert s_ in text, s_
    assert SCRIPT not in markup and IMG not in markup


def test_no_render_function_takes_html():
    "A card's key, value and detail are text: markup passed in comes out escaped (the old `_card` took raw HTML)."
    from cryptobot.monitor import BR, Span, card, render, _TEMPLATES
    _TEMPLATES.setdefault("_card_test", '{% from "macros" import card %}{{ card(c) }}')
    out = render("_card_test", c=card(SCRIPT, [SCRIPT, BR, Span(IMG, id="x")], Span(IMG, bold=True), "bad"))
    page = _Page(out)
    assert set(page.tags) == {"div", "span", "br", "b"} and "".join(page.text) == SCRIPT * 2 + IMG * 2


def test_markup_lives_only_in_autoescaped_templates():
    "No hand escaping and no way around autoescape in the monitor: no html.escape, no Markup, no |safe, autoescape on."
    import inspect
    import cryptobot.monitor as m
    src = inspect.getsource(m)
    for bad in ("html.escape", "Markup", "|safe", "| safe", "autoescape=False"):
        assert bad not in src, f"{bad} in cryptobot/monitor.py"
    assert m._JINJA.autoescape is True and "<script>" not in m.render("error", text="<script>")


def test_child_environment_carries_the_portfolio_and_loads_back():
    "Several symbols: the Voila child gets CRYPTOBOT_SYMBOLS and the portfolio limits (not also CRYPTOBOT_SYMBOL, a "
    "settings error next to a differing CRYPTOBOT_SYMBOLS); one symbol: as before."
    from cryptobot.monitor import dashboard_env, dashboard_settings
    syms = ("BTC/USDT", "ETH/USDT", "SOL/USDT")
    s = Settings(symbols=syms, max_open_positions=2, max_total_risk_pct=1.5)
    env = dashboard_env(s, base={"BINANCE_API_KEY": "cbFAKEkeyAAAA1111", "CRYPTOBOT_SYMBOL": "XRP/USDT"})
    assert "CRYPTOBOT_SYMBOL" not in env and "BINANCE_API_KEY" not in env
    back = dashboard_settings(env=env)
    assert (back.symbols, back.symbol, back.max_open_positions, back.max_total_risk_pct) == (syms, "BTC/USDT", 2, 1.5)
    one = dashboard_env(Settings(symbol="ETH/USDT"), base={})
    assert one["CRYPTOBOT_SYMBOL"] == "ETH/USDT" and not [k for k in one if k.startswith("CRYPTOBOT_MAX_OPEN")]
    assert "CRYPTOBOT_SYMBOLS" not in one
