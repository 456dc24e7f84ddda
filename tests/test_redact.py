"""One redaction helper (`cryptobot.files.redact`): the same leak text through every path that prints, logs, journals
or sends text comes out masked, and the patterns it masks are defined once in the package."""
from __future__ import annotations

import io
import logging
import re
import socket
from pathlib import Path

import ccxt
import pytest

import cryptobot
from cryptobot.cli import main
from cryptobot.client import make_client
from cryptobot.config import Settings
from cryptobot.exchange import BinanceExecutor, protect_logs
from cryptobot.live import setup_logging
from cryptobot.notify import Notifier

SECRET, HEADER_KEY = "S3cr3tV4lue-7Qz", "K3YhdrValue99"
LEAK = f"key {SECRET} GET /api/v3/order?symbol=BTCUSDT&signature=abc123 headers {{'X-MBX-APIKEY': '{HEADER_KEY}'}}"


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def via_cli(monkeypatch, capsys):
    monkeypatch.setenv("BINANCE_API_SECRET", SECRET)
    assert main(["--env-file", f"/nonexistent/{LEAK}", "config"]) == 78
    return capsys.readouterr().err


def via_executor(monkeypatch, capsys):
    client = make_client(api_key="exch-key-5b1c", api_secret=SECRET, base_url=f"http://127.0.0.1:{_closed_port()}")
    ex = BinanceExecutor(client, None, None, Settings())
    return ex._safe(ccxt.AuthenticationError(LEAK))


def via_exchange_log_filter(monkeypatch, capsys):
    protect_logs(SECRET)
    rec = logging.LogRecord("ccxt", logging.DEBUG, "", 0, "%s", (LEAK,), None)
    for f in logging.getLogger("ccxt").filters:
        f.filter(rec)
    return rec.getMessage()


def via_live_log(monkeypatch, capsys):
    buf = io.StringIO()
    h = setup_logging(Settings(api_key="live-key-9d2e", api_secret=SECRET), stream=buf)
    try:
        logging.getLogger("cryptobot.live").warning("poll failed: %s", LEAK)
    finally:
        for name in ("cryptobot", "ccxt"):
            logging.getLogger(name).removeHandler(h)
    return buf.getvalue()


def via_notifier(monkeypatch, capsys):
    got = []
    n = Notifier([f"json://127.0.0.1:{_closed_port()}/hook/{SECRET}"], on_failure=lambda *a: got.append(a), start=False)
    n._record("notify_failed", f"notify: not delivered: {LEAK}")
    return " ".join(str(a) for a in got)


@pytest.mark.parametrize("path", [via_cli, via_executor, via_exchange_log_filter, via_live_log, via_notifier],
                         ids=lambda f: f.__name__)
def test_every_output_path_masks_the_same_leak(path, monkeypatch, capsys):
    out = path(monkeypatch, capsys)
    assert "GET /api/v3/order" in out                                  # the line itself did come out
    assert SECRET not in out and "abc123" not in out and HEADER_KEY not in out, out
    assert "signature=****" in out and "X-MBX-APIKEY': '****'" in out, out


def test_the_masking_patterns_are_defined_once():
    src = {p.name: p.read_text() for p in Path(cryptobot.__file__).parent.glob("*.py") if p.name != "_modidx.py"}
    for pattern in (r"re\.compile\(r?[\"']\(signature=", r"re\.compile\(r?[\"']\(X-MBX-APIKEY"):
        where = [n for n, t in src.items() for _ in re.finditer(pattern, t)]
        assert where == ["files.py"], (pattern, where)
