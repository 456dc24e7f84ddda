"""download_candles with the real ccxt.binance against a tiny Binance-klines server on 127.0.0.1 (with faults).

The server is deliberately small (exchangeInfo + klines); the full emulator lives in cryptobot.emulator.
"""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pandas as pd
import pytest

from cryptobot import data as D
from cryptobot.client import make_client
from cryptobot.data import CandleDataError, DownloadError

T0 = pd.Timestamp("2024-01-01", tz="UTC")
HOUR_MS = 3_600_000

EXCHANGE_INFO = {
    "timezone": "UTC", "serverTime": 0, "rateLimits": [], "exchangeFilters": [],
    "symbols": [{
        "symbol": "BTCUSDT", "status": "TRADING", "baseAsset": "BTC", "baseAssetPrecision": 8,
        "quoteAsset": "USDT", "quotePrecision": 8, "quoteAssetPrecision": 8, "baseCommissionPrecision": 8,
        "quoteCommissionPrecision": 8, "orderTypes": ["LIMIT", "MARKET", "STOP_LOSS_LIMIT"],
        "icebergAllowed": False, "ocoAllowed": False, "quoteOrderQtyMarketAllowed": True,
        "isSpotTradingAllowed": True, "isMarginTradingAllowed": False, "permissions": [],
        "permissionSets": [["SPOT"]],
        "filters": [
            {"filterType": "PRICE_FILTER", "minPrice": "0.01000000", "maxPrice": "1000000.00000000",
             "tickSize": "0.01000000"},
            {"filterType": "LOT_SIZE", "minQty": "0.00001000", "maxQty": "9000.00000000", "stepSize": "0.00001000"},
            {"filterType": "NOTIONAL", "minNotional": "5.00000000", "applyMinToMarket": True,
             "maxNotional": "9000000.00000000", "applyMaxToMarket": False, "avgPriceMins": 5},
        ],
    }],
}


class Market:
    "The server's state: candles (the last one is forming), a fault queue, and a request log."

    def __init__(self, candles: pd.DataFrame):
        self.candles = candles.map(lambda x: float(f"{x:.8f}"))    # what the wire can carry exactly
        self.faults: list = []        # consumed one per klines request: '429', '418', '500', 'drop', 'empty', 'bad'
        self.stuck = False            # ignore startTime (always serve from the beginning)
        self.klines: list = []        # startTime of every klines request
        self.info_calls = 0
        self.time_calls = 0
        self.server_now = now_for(len(candles) - 1)     # the exchange's clock: the last candle is forming
        self.lock = threading.Lock()

    def rows(self, start, limit):
        c = self.candles
        if start is not None and not self.stuck:
            c = c[c.index >= pd.Timestamp(int(start), unit="ms", tz="UTC")]
        c = c.iloc[:limit]
        out = []
        for t, (o, h, lo, cl, v) in zip(c.index, c.to_numpy()):
            ms = int(t.value // 1_000_000)
            out.append([ms, f"{o:.8f}", f"{h:.8f}", f"{lo:.8f}", f"{cl:.8f}", f"{v:.8f}", ms + HOUR_MS - 1,
                        f"{v * cl:.8f}", 100, f"{v / 2:.8f}", f"{v * cl / 2:.8f}", "0"])
        return out


def make_handler(market: Market):
    class Handler(BaseHTTPRequestHandler):
        disable_nagle_algorithm = True

        def log_message(self, *a):
            pass

        def send(self, status, body, headers=()):
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self):
            url = urlsplit(self.path)
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            if url.path == "/api/v3/exchangeInfo":
                with market.lock:
                    market.info_calls += 1
                return self.send(200, EXCHANGE_INFO)
            if url.path == "/api/v3/time":
                with market.lock:
                    market.time_calls += 1
                    fault = market.faults.pop(0) if market.faults else None
                if fault == "500":
                    return self.send(500, b"<html>Internal Server Error</html>")
                return self.send(200, {"serverTime": int(market.server_now.value // 1_000_000)})
            if url.path != "/api/v3/klines":
                return self.send(404, {"code": -1, "msg": "not here"})
            with market.lock:
                market.klines.append(int(q["startTime"]) if "startTime" in q else None)
                fault = market.faults.pop(0) if market.faults else None
            if fault == "429":
                return self.send(429, {"code": -1003, "msg": "Too many requests."}, [("Retry-After", "3")])
            if fault == "418":
                return self.send(418, {"code": -1003, "msg": "Way too many requests; IP banned."},
                                 [("Retry-After", "120")])
            if fault == "500":
                return self.send(500, b"<html>Internal Server Error</html>")
            if fault == "drop":
                self.close_connection = True
                return                                              # no response at all
            if fault == "empty":
                return self.send(200, [])
            assert q["symbol"] == "BTCUSDT" and q["interval"] == "1h", q
            rows = market.rows(q.get("startTime"), min(int(q.get("limit", 500)), 1000))
            if fault == "bad" and rows:
                rows[0][2], rows[0][3] = rows[0][3], rows[0][2]      # high < low
            if fault == "inf" and rows:
                rows[-1][1] = rows[-1][2] = rows[-1][4] = "1e400"   # open, high, close overflow to inf
            if fault == "inf_volume" and rows:
                rows[-1][5] = "inf"
            return self.send(200, rows)

    return Handler


def candles(n_closed: int) -> pd.DataFrame:
    "n closed hourly candles from T0 plus one still forming."
    return D.synthetic_candles(n_closed + 1, start=T0)


def now_for(n_closed: int) -> pd.Timestamp:
    return T0 + pd.Timedelta(hours=n_closed, minutes=20)           # candle n_closed opened 20 minutes ago


@pytest.fixture
def server():
    market = Market(candles(2_500))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(market))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    market.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield market
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


class Sleeps(list):
    def __call__(self, s):
        self.append(s)


def download(market, data_dir, since=T0, n_closed=2_500, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("sleep", Sleeps())
    kw.setdefault("now", now_for(n_closed))
    client = make_client("binance", base_url=market.url, timeout_ms=3_000)
    return D.download_candles("BTC/USDT", "1h", since, data_dir, client=client, **kw)


def ms(i: int) -> int:
    return int((T0 + pd.Timedelta(hours=i)).value // 1_000_000)


def expected(market, a, b):
    e = market.candles.iloc[a:b].copy()
    e.index = e.index.rename("timestamp")
    return e


def listing(d):
    return sorted(str(p.relative_to(d)) for p in d.rglob("*")) if d.exists() else []


def test_full_download_paginates_and_drops_the_forming_candle(server, tmp_path):
    path, n_new = download(server, tmp_path)
    assert n_new == 2_500 and path == D.raw_path(tmp_path, "BTC/USDT", "1h")
    assert server.klines == [ms(0), ms(1000), ms(2000)]                  # 3 pages, each from the right place
    assert server.info_calls == 1
    stored = D.load_candles(path)
    pd.testing.assert_frame_equal(stored, expected(server, 0, 2_500), check_freq=False)
    assert stored.index[-1] == T0 + pd.Timedelta(hours=2_499)            # the forming candle 2500 is not there
    assert D.validate_candles(stored, "1h", now=now_for(2_500)).ok
    assert listing(tmp_path) == ["raw", "raw/binance_BTC-USDT_1h.parquet"]


def test_resume_requests_only_new_pages(server, tmp_path):
    D.save_candles(expected(server, 0, 1_200), D.raw_path(tmp_path, "BTC/USDT", "1h"))
    path, n_new = download(server, tmp_path, since=T0)                   # since before the store: resume wins
    assert n_new == 1_300 and server.klines == [ms(1200), ms(2200)]
    pd.testing.assert_frame_equal(D.load_candles(path), expected(server, 0, 2_500), check_freq=False)
    # up to date: not a single klines request, store untouched
    server.klines.clear()
    mtime = path.stat().st_mtime_ns
    assert download(server, tmp_path, since=None) == (path, 0)
    assert server.klines == [] and path.stat().st_mtime_ns == mtime
    # two more hours close: one request, from the first candle not stored
    more = Market(candles(2_502)).candles.iloc[2_500:]
    server.candles = pd.concat([server.candles.iloc[:2_500], more])
    path, n_new = download(server, tmp_path, since=None, n_closed=2_502)
    assert n_new == 2 and server.klines == [ms(2500)]


def test_retries_429_418_5xx_and_dropped_connection(server, tmp_path):
    server.faults = ["429", "500", "drop", "418"]
    sleeps = Sleeps()
    path, n_new = download(server, tmp_path, sleep=sleeps)
    assert n_new == 2_500
    assert server.klines == [ms(0)] * 5 + [ms(1000), ms(2000)]           # 4 failed attempts, then the 3 pages
    assert len(sleeps) == 4
    assert 3.0 <= sleeps[0] <= 3.3                                        # 429: the server's Retry-After
    assert sleeps[3] >= 120                                               # 418: the ban pause
    pd.testing.assert_frame_equal(D.load_candles(path), expected(server, 0, 2_500), check_freq=False)


def test_hard_failure_writes_nothing(server, tmp_path):
    # no store yet: page 2 keeps failing -> nothing at all is written
    server.faults = [None, "500", "500", "500"]
    with pytest.raises(DownloadError) as e:
        download(server, tmp_path, retries=2)
    msg = str(e.value)
    assert "\n" not in msg and "nothing written" in msg and "2024-02-11 16:00" in msg   # where it failed
    assert listing(tmp_path) == []
    # with a store: it stays byte for byte
    store = D.save_candles(expected(server, 0, 500), D.raw_path(tmp_path, "BTC/USDT", "1h"))
    before = store.read_bytes()
    server.faults = [None, "drop", "drop", "drop"]
    with pytest.raises(DownloadError):
        download(server, tmp_path, retries=2)
    assert store.read_bytes() == before and listing(tmp_path) == ["raw", "raw/binance_BTC-USDT_1h.parquet"]


def test_defective_page_is_refused(server, tmp_path):
    server.faults = [None, "bad"]
    with pytest.raises(DownloadError, match="defective candles: 1 high < low") as e:
        download(server, tmp_path)
    assert e.value.report is not None and e.value.report.high_lt_low == 1
    assert listing(tmp_path) == []


@pytest.mark.parametrize("fault", ["inf", "inf_volume"])
def test_non_finite_page_is_refused(server, tmp_path, fault):
    server.faults = [None, fault]                                     # page 2's last candle is infinite
    with pytest.raises(DownloadError, match=r"defective candles: [13] non-finite value") as e:
        download(server, tmp_path)
    assert "\n" not in str(e.value) and "nothing written" in str(e.value)
    assert e.value.report is not None and e.value.report.non_finite >= 1
    assert e.value.report.first_at["non_finite"] == T0 + pd.Timedelta(hours=1_999)
    assert listing(tmp_path) == []


def test_stops_on_empty_page_and_on_a_stuck_server(server, tmp_path):
    server.faults = [None, "empty"]
    path, n_new = download(server, tmp_path / "a")
    assert n_new == 1_000 and len(server.klines) == 2                     # stopped cleanly, kept page 1
    server.klines.clear()
    server.stuck = True                                                   # ignores startTime
    path, n_new = download(server, tmp_path / "b")
    assert n_new == 1_000 and server.klines == [ms(0), ms(1000)]          # no infinite loop


def test_until_and_max_pages(server, tmp_path):
    path, n_new = download(server, tmp_path, until=T0 + pd.Timedelta(hours=1_500))
    assert n_new == 1_500 and server.klines == [ms(0), ms(1000)]
    assert D.load_candles(path).index[-1] == T0 + pd.Timedelta(hours=1_499)
    server.klines.clear()
    path, n_new = download(server, tmp_path, since=None, max_pages=1)
    assert n_new == 1_000 and server.klines == [ms(1500)]
    server.klines.clear()
    assert download(server, tmp_path, since=None) == (path, 0) and server.klines == []


def test_unknown_symbol_and_missing_since(server, tmp_path):
    client = make_client("binance", base_url=server.url)
    with pytest.raises(DownloadError, match="no spot market 'ETH/BTC'"):
        D.download_candles("ETH/BTC", "1h", T0, tmp_path, client=client, now=now_for(2_500), progress=False)
    with pytest.raises(CandleDataError, match="give a start time"):
        D.download_candles("BTC/USDT", "1h", None, tmp_path, client=client, now=now_for(2_500), progress=False)
    assert listing(tmp_path) == [] and server.klines == []


def test_progress_bar_goes_to_stderr(server, tmp_path, capsys):
    download(server, tmp_path, progress=True, until=T0 + pd.Timedelta(hours=10))
    err = capsys.readouterr().err
    assert "BTC/USDT 1h" in err and "candle" in err
    download(server, tmp_path, progress=False, since=None, until=T0 + pd.Timedelta(hours=20))
    assert capsys.readouterr().err == ""


def test_closed_is_judged_by_the_exchange_clock(server, tmp_path):
    # The local clock says 2025+: every candle looks closed. The exchange says candle 2500 opened 20 min ago.
    assert pd.Timestamp.now(tz="UTC") > server.candles.index[-1] + pd.Timedelta("1h")
    path, n_new = download(server, tmp_path, now=None)
    assert n_new == 2_500 and server.time_calls == 1
    assert D.load_candles(path).index[-1] == T0 + pd.Timedelta(hours=2_499)
    # the time endpoint failing persistently is a download failure too: nothing written
    server.faults = ["500"] * 3
    with pytest.raises(DownloadError, match="fetch_time|ExchangeNotAvailable"):
        download(server, tmp_path / "x", now=None, retries=2)
    assert listing(tmp_path / "x") == []
