"""cryptobot.data: loading, validation, the store, import, the synthetic market, and the real shared files."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from cryptobot import data as D
from cryptobot.data import OHLCV, CandleDataError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SPOT = SHARED / "binance-spot_BTCUSDT_1h_2019-12-10_2020-12-10.csv"
FUT1H = SHARED / "binance-usdm_BTCUSDT_1h_2020-09-13_2025-09-11.csv"
FUT4H = SHARED / "binance-usdm_BTCUSDT_4h_2020-09-13_2025-09-11.csv"

HEADER = "timestamp,open,high,low,close,volume\n"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data absent: {path} (real-data tests need ../shared/data)")
    return path


def grid(n=6, start="2024-03-01", freq="1h", **vals):
    idx = pd.date_range(start, periods=n, freq=freq, tz="UTC", name="timestamp")
    base = {"open": 100.0, "high": 101.0, "low": 99.0, "close": 100.5, "volume": 5.0}
    base.update(vals)
    df = pd.DataFrame(base, index=idx, columns=OHLCV).astype("float64")
    df.attrs["source"] = "test"
    return df


def files_under(d: Path) -> list:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*")) if d.exists() else []


# ------------------------------------------------------------------ loading: formats
EXPECTED = pd.DataFrame(
    {"open": [99.0, 100.0, 101.0], "high": [101.0, 102.0, 104.0], "low": [98.0, 99.0, 100.0],
     "close": [100.0, 101.0, 103.0], "volume": [10.0, 11.0, 12.5]},
    index=pd.date_range("2020-01-01", periods=3, freq="1h", tz="UTC", name="timestamp"))

ROWS = [("2020-01-01 00:00:00", 99, 101, 98, 100, 10), ("2020-01-01 01:00:00", 100, 102, 99, 101, 11),
        ("2020-01-01 02:00:00", 101, 104, 100, 103, 12.5)]


def _csv(rows, header="timestamp,open,high,low,close,volume", fmt=lambda t: t):
    return header + "\n" + "".join(f"{fmt(t)},{o},{h},{lo},{c},{v}\n" for t, o, h, lo, c, v in rows)


def _epoch(unit):
    return lambda t: int(pd.Timestamp(t, tz="UTC").value // {"s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1}[unit])


FORMATS = {
    "iso": _csv(ROWS),
    "iso_T_Z": _csv(ROWS, fmt=lambda t: t.replace(" ", "T") + "Z"),
    "offset": _csv(ROWS, fmt=lambda t: (pd.Timestamp(t, tz="UTC").tz_convert("Etc/GMT-2")).isoformat()),
    "newest_first": _csv(ROWS[::-1]),
    "epoch_ms_open_time": _csv(ROWS, header="open_time,open,high,low,close,volume", fmt=_epoch("ms")),
    "epoch_s": _csv(ROWS, fmt=_epoch("s")),
    "epoch_us": _csv(ROWS, fmt=_epoch("us")),
    "date_column": _csv(ROWS, header="date,open,high,low,close,volume"),
    "time_column_caps": _csv(ROWS, header="Time,Open,High,Low,Close,Volume"),
    "shuffled_extra": "trades,volume,close,low,high,open,timestamp,close_time\n" + "".join(
        f"7,{v},{c},{lo},{h},{o},{t},123\n" for t, o, h, lo, c, v in ROWS),
    "spaces": "timestamp, open, high, low, close, volume\n" + "".join(
        f"{t}, {o}, {h}, {lo}, {c}, {v}\n" for t, o, h, lo, c, v in ROWS),
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_load_csv_variants_give_the_canonical_frame(tmp_path, name):
    p = tmp_path / f"{name}.csv"
    p.write_text(FORMATS[name])
    df = D.load_candles(p)
    pd.testing.assert_frame_equal(df, EXPECTED, check_freq=False)
    assert list(df.columns) == OHLCV and (df.dtypes == "float64").all()
    assert isinstance(df.index, pd.DatetimeIndex) and str(df.index.tz) == "UTC" and df.index.name == "timestamp"
    assert df.index.is_monotonic_increasing and df.index.is_unique
    assert df.attrs["source"] == f"real:{name}.csv"


def test_load_parquet_with_column_index_and_odd_suffix(tmp_path):
    raw = pd.DataFrame({"close": [100.0, 101.0, 103.0], "timestamp": EXPECTED.index.tz_localize(None),
                        "open": [99, 100, 101], "high": [101, 102, 104], "low": [98, 99, 100],
                        "volume": [10, 11, 12.5], "junk": ["a", "b", "c"]})
    raw.to_parquet(tmp_path / "a.parquet")
    pd.testing.assert_frame_equal(D.load_candles(tmp_path / "a.parquet"), EXPECTED, check_freq=False)
    EXPECTED.to_parquet(tmp_path / "b.dat")                      # parquet recognised by magic bytes
    pd.testing.assert_frame_equal(D.load_candles(tmp_path / "b.dat"), EXPECTED, check_freq=False)


def test_exact_duplicates_collapse_and_are_reported(tmp_path):
    p = tmp_path / "dup.csv"
    p.write_text(_csv([ROWS[2], ROWS[1], ROWS[1], ROWS[0], ROWS[1]]))
    raw = D.parse_candles(p)
    assert len(raw) == 5 and not raw.index.is_unique                 # parse keeps the source as it is
    rep = D.validate_candles(raw, "1h", now="2024-01-01")
    assert (rep.duplicates, rep.conflicting_duplicates, rep.order, rep.ok) == (2, 0, "unordered", True)
    assert rep.out_of_order == 2
    df = D.load_candles(p)
    pd.testing.assert_frame_equal(df, EXPECTED, check_freq=False)
    rep2 = D.validate_candles(df, "1h", now="2024-01-01")              # from attrs['ingest']
    assert (rep2.duplicates, rep2.order, rep2.out_of_order) == (2, "unordered", 2)
    assert D.validate_candles(df.iloc[:2], "1h", now="2024-01-01").duplicates == 0   # a slice: stale ingest ignored


def test_conflicting_duplicates_are_refused_and_nothing_written(tmp_path):
    p = tmp_path / "conflict.csv"
    p.write_text(_csv(ROWS + [("2020-01-01 01:00:00", 100, 102, 99, 101.5, 11)]))
    with pytest.raises(CandleDataError) as e:
        D.load_candles(p)
    msg = str(e.value)
    assert "conflict.csv" in msg and "2020-01-01 01:00" in msg and "\n" not in msg
    rep = D.validate_candles(D.parse_candles(p), "1h", now="2024-01-01")
    assert rep.conflicting_duplicates == 1 and not rep.ok
    assert rep.first_at["conflicting_duplicates"] == pd.Timestamp("2020-01-01 01:00", tz="UTC")
    with pytest.raises(CandleDataError) as e:
        D.import_candles(p, "BTC/USDT", "1h", tmp_path / "data")
    assert e.value.report is not None and e.value.report.conflicting_duplicates == 1
    assert files_under(tmp_path / "data") == []


# ------------------------------------------------------------------ malformed inputs
MALFORMED = {
    "empty.csv": (b"", "empty file"),
    "blank.csv": (b"\n\n", "no header"),
    "header_only.csv": (HEADER.encode(), "header only"),
    "missing_col.csv": (b"timestamp,open,high,low,volume\n2020-01-01,1,2,0.5,3\n", "missing column(s) close"),
    "bad_price.csv": ((HEADER + "2020-01-01 00:00,1,2,0.5,1.5,3\n2020-01-01 01:00,1,2,0.5,1.x5,3\n").encode(),
                      "line 3: close '1.x5' is not a number"),
    "bad_time.csv": ((HEADER + "2020-01-01 00:00,1,2,0.5,1.5,3\n2020-13-45 01:00,1,2,0.5,1.5,3\n").encode(),
                     "line 3: timestamp '2020-13-45 01:00' is not a date/time"),
    "empty_time.csv": ((HEADER + "2020-01-01 00:00,1,2,0.5,1.5,3\n,1,2,0.5,1.5,3\n").encode(), "empty timestamp"),
    "garbage.bin": (bytes(range(256)) * 8, "binary"),
    "latin1.csv": ((HEADER + "2020-01-01 00:00,1,2,0.5,1.5,3\n").encode() + b"\xff\xfe caf\xe9\n", "UTF-8"),
    "not_parquet.parquet": (b"PAR1 this is not really parquet", "not a readable parquet"),
    "prose.txt": (b"Dear diary,\nthe market went up today.\n", "missing column(s)"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_file_one_line_error_and_nothing_written(tmp_path, name):
    content, expect = MALFORMED[name]
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(CandleDataError) as e:
        D.load_candles(p)
    msg = str(e.value)
    assert "\n" not in msg and name in msg and expect in msg, msg
    data_dir = tmp_path / "data"
    with pytest.raises(CandleDataError):
        D.import_candles(p, "BTC/USDT", "1h", data_dir)
    assert files_under(data_dir) == []


def test_missing_file_and_directory(tmp_path):
    for p, expect in [(tmp_path / "nope.csv", "file not found"), (tmp_path, "directory")]:
        with pytest.raises(CandleDataError, match=expect) as e:
            D.load_candles(p)
        assert str(p) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CandleDataError, match="file not found"):
        D.import_candles(tmp_path / "nope.csv", "BTC/USDT", "1h", tmp_path / "data")
    assert not (tmp_path / "data").exists()


# ------------------------------------------------------------------ validation
NOW = pd.Timestamp("2024-06-01", tz="UTC")


def _defect(kind):
    df = grid(8)
    t = df.index
    if kind == "nan_cells":
        df.loc[t[2], "volume"] = np.nan
    elif kind == "non_positive":
        df.loc[t[2], ["open", "low"]] = [0.0, 0.0]
    elif kind == "negative_volume":
        df.loc[t[2], "volume"] = -1.0
    elif kind == "high_lt_low":
        df.loc[t[2], ["high", "low", "open", "close"]] = [99.0, 99.5, 99.2, 99.3]
    elif kind == "close_outside":
        df.loc[t[2], "close"] = 101.5
    elif kind == "open_outside":
        df.loc[t[2], "open"] = 98.0
    elif kind == "future":
        df = grid(8, start=NOW - pd.Timedelta("5h"))
        return df, df.index[7]
    elif kind == "misaligned":
        df = df.rename(index={t[2]: t[2] + pd.Timedelta("30min")})
        return df, t[2] + pd.Timedelta("30min")
    return df, t[2]


@pytest.mark.parametrize("kind", ["nan_cells", "non_positive", "negative_volume", "high_lt_low", "close_outside",
                                  "open_outside", "future", "misaligned"])
def test_each_hard_defect_is_counted_and_refused(kind, tmp_path):
    df, at = _defect(kind)
    rep = D.validate_candles(df, "1h", now=NOW)
    assert getattr(rep, kind) == (1 if kind != "future" else 2)
    assert not rep.ok and len(rep.hard) >= 1
    key = {"nan_cells": "nan"}.get(kind, kind)
    assert rep.first_at[key] == (at if kind != "future" else NOW + pd.Timedelta("1h"))
    clean = D.validate_candles(grid(8), "1h", now=NOW)
    assert clean.ok and clean.hard == {} and getattr(clean, kind) == 0
    # import refuses with one line and writes nothing
    src = tmp_path / "bad.parquet"
    df.reset_index().to_parquet(src)
    with pytest.raises(CandleDataError) as e:
        D.import_candles(src, "BTC/USDT", "1h", tmp_path / "data", now=NOW)
    assert str(e.value).startswith("refusing to import") and "nothing written" in str(e.value)
    assert "\n" not in str(e.value) and e.value.report is not None and not e.value.report.ok
    assert files_under(tmp_path / "data") == []


def test_spacing_mismatch_is_hard():
    four = grid(30, freq="4h")
    rep = D.validate_candles(four, "1h", now=NOW)
    assert rep.spacing == pd.Timedelta("4h") and rep.spacing_mismatch and not rep.ok
    assert D.validate_candles(four, "4h", now=NOW).ok


def test_soft_defects_keep_ok():
    df = grid(10)
    df = df.drop(df.index[[3, 4, 7]])
    df.loc[df.index[1], "volume"] = 0.0
    rep = D.validate_candles(df, "1h", now=df.index[-1] + pd.Timedelta("10min"))
    assert rep.ok and rep.gaps == 2 and rep.missing_candles == 3 and rep.zero_volume == 1 and rep.forming
    assert rep.longest_gap == pd.Timedelta("3h") and rep.longest_gap_missing == 2
    assert rep.longest_gap_start == grid(10).index[3]
    assert rep.gap_list == [(grid(10).index[3], 2), (grid(10).index[7], 1)]
    assert len(rep.warnings) == 3 and rep.expected_rows == 10


def test_forming_and_closed_only():
    df = grid(5)
    last = df.index[-1]
    for now, forming, kept in [(last, True, 4), (last + pd.Timedelta("59min"), True, 4),
                               (last + pd.Timedelta("1h"), False, 5), (last - pd.Timedelta("1s"), True, 3)]:
        rep = D.validate_candles(df, "1h", now=now)
        assert rep.forming is forming, now
        assert len(D.closed_only(df, "1h", now=now)) == kept
    assert D.validate_candles(df, "1h", now=last - pd.Timedelta("1s")).future == 1
    assert len(D.closed_only(df, "1h", now=last - pd.Timedelta("1h"))) == 3     # future and forming dropped


def test_empty_frame_is_not_ok():
    rep = D.validate_candles(grid(3).iloc[:0], "1h", now=NOW)
    assert rep.rows == 0 and not rep.ok and "no candle rows" in rep.hard
    rep.summary()


def test_not_a_candle_frame_raises():
    with pytest.raises(CandleDataError, match="not a candle frame"):
        D.validate_candles(grid(3).drop(columns="close"), "1h")
    with pytest.raises(CandleDataError, match="not a candle frame"):
        D.validate_candles(grid(3).tz_localize(None), "1h")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(2, 200), holes=st.lists(st.integers(1, 198), max_size=40), data=st.data())
def test_gap_counts_match_an_independent_computation(n, holes, data):
    full = grid(n)
    drop = sorted({h for h in holes if h < n - 1})                    # keep first and last
    df = full.drop(full.index[drop])
    # shuffle rows: validation must not depend on source order
    perm = data.draw(st.permutations(range(len(df))))
    rep = D.validate_candles(df.iloc[list(perm)], "1h", now=NOW)
    missing = sorted(set(full.index) - set(df.index))
    runs = []
    for t in missing:
        if runs and t - runs[-1][-1] == pd.Timedelta("1h"):
            runs[-1].append(t)
        else:
            runs.append([t])
    assert rep.missing_candles == len(missing) and rep.gaps == len(runs)
    assert rep.expected_rows == n and rep.rows == len(df)
    if runs:
        longest = max(runs, key=len)                                   # first of the longest (argmax)
        assert rep.longest_gap_missing == len(longest)
        assert rep.longest_gap == pd.Timedelta(hours=len(longest) + 1)
        assert rep.longest_gap_start == longest[0]
        assert rep.gap_list == [(r[0], len(r)) for r in runs]
    else:
        assert rep.longest_gap == pd.Timedelta(0) and rep.longest_gap_start is None


def test_summary_is_one_screen_and_json():
    df = grid(300)
    df = df.drop(df.index[[5, 6, 50, 100, 101, 102, 150, 200, 250]])
    df.loc[df.index[10], "high"] = 90.0
    rep = D.validate_candles(df, "1h", now=NOW)
    text = rep.summary()
    lines = text.splitlines()
    assert len(lines) <= 34 and max(map(len, lines)) <= 120
    assert "REFUSED" in text and "high < low" in text and "longest 4h from 2024-03-05 04:00" in text
    assert "… and 1 smaller gap(s)" in text
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["ok"] is False and d["gaps"] == 6 and d["missing_candles"] == 9 and d["high_lt_low"] == 1
    assert "1 high < low (first 2024-03-01 12:00)" in rep.refusal()


# ------------------------------------------------------------------ store
def test_raw_path():
    assert D.raw_path("data", "BTC/USDT", "1h") == Path("data/raw/binance_BTC-USDT_1h.parquet")
    assert D.raw_path(Path("/x"), "eth/usdt", "4h", "kraken") == Path("/x/raw/kraken_ETH-USDT_4h.parquet")
    for bad in ["../etc/passwd", "BTC/USDT/../..", "", "BTC USDT"]:
        with pytest.raises(CandleDataError):
            D.raw_path("data", bad, "1h")
    with pytest.raises(CandleDataError):
        D.raw_path("data", "BTC/USDT", "1h", exchange="../bin")
    with pytest.raises(CandleDataError, match="unknown timeframe"):
        D.raw_path("data", "BTC/USDT", "7h")


def test_save_roundtrip_and_refuses_non_canonical(tmp_path):
    df = D.synthetic_candles(500)
    p = D.save_candles(df, tmp_path / "sub" / "s.parquet")
    back = D.load_candles(p)
    pd.testing.assert_frame_equal(back, df, check_freq=False)
    assert back.attrs["source"] == "synthetic"
    assert files_under(tmp_path) == ["sub", "sub/s.parquet"]
    for bad in [df.iloc[::-1], df[["close", "open", "high", "low", "volume"]], df.tz_convert("Europe/Berlin"),
                pd.concat([df, df.iloc[-1:]])]:
        with pytest.raises(CandleDataError, match="non-canonical"):
            D.save_candles(bad, tmp_path / "bad.parquet")
    assert not (tmp_path / "bad.parquet").exists()


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    p = D.save_candles(D.synthetic_candles(50), tmp_path / "s.parquet")
    before = p.read_bytes()

    def half_written(self, f, *a, **k):
        f.write(b"PAR1 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", half_written)
    with pytest.raises(CandleDataError, match="previous file is unchanged") as e:
        D.save_candles(D.synthetic_candles(60), p)
    assert "\n" not in str(e.value)
    assert p.read_bytes() == before and files_under(tmp_path) == ["s.parquet"]


def _write(tmp_path, name, df):
    p = tmp_path / name
    out = df.reset_index()
    out["timestamp"] = out["timestamp"].dt.strftime("%Y-%m-%d %H:%M:%S")
    out.to_csv(p, index=False)
    return p


def test_import_merges_union_and_refuses_conflicts(tmp_path):
    syn = D.synthetic_candles(100, start="2024-01-01")
    data_dir = tmp_path / "data"
    now = syn.index[-1] + pd.Timedelta("2h")
    p, rep = D.import_candles(_write(tmp_path, "a.csv", syn.iloc[:60]), "BTC/USDT", "1h", data_dir, now=now)
    assert (rep.added_rows, rep.stored_rows) == (60, 60) and p == D.raw_path(data_dir, "BTC/USDT", "1h")
    # overlapping file: the overlap agrees, only new rows are added
    p, rep = D.import_candles(_write(tmp_path, "b.csv", syn.iloc[40:100]), "BTC/USDT", "1h", data_dir, now=now)
    assert (rep.added_rows, rep.stored_rows) == (40, 100)
    pd.testing.assert_frame_equal(D.load_candles(p), syn, check_freq=False, rtol=1e-12)
    # the same file again: nothing new, the file is not rewritten
    mtime = p.stat().st_mtime_ns
    p, rep = D.import_candles(_write(tmp_path, "b.csv", syn.iloc[40:100]), "BTC/USDT", "1h", data_dir, now=now)
    assert rep.added_rows == 0 and p.stat().st_mtime_ns == mtime
    # a conflicting candle: refused, store unchanged
    other = syn.iloc[90:].copy()
    other.iloc[3, 4] *= 1.001                                          # volume differs
    before = p.read_bytes()
    with pytest.raises(CandleDataError, match=r"1 candle\(s\) differ from the store") as e:
        D.import_candles(_write(tmp_path, "c.csv", other), "BTC/USDT", "1h", data_dir, now=now)
    assert "\n" not in str(e.value) and "nothing written" in str(e.value)
    assert p.read_bytes() == before and files_under(data_dir) == ["raw", "raw/binance_BTC-USDT_1h.parquet"]


def test_import_drops_the_forming_candle(tmp_path):
    syn = D.synthetic_candles(10, start="2024-01-01")
    now = syn.index[-1] + pd.Timedelta("15min")
    p, rep = D.import_candles(_write(tmp_path, "a.csv", syn), "BTC/USDT", "1h", tmp_path / "d", now=now)
    assert rep.forming and rep.ok and rep.stored_rows == 9 and D.load_candles(p).index[-1] == syn.index[-2]
    assert any("still forming" in w for w in rep.warnings)
    with pytest.raises(CandleDataError, match="no closed candle"):
        D.import_candles(_write(tmp_path, "b.csv", syn.iloc[-1:]), "BTC/USDT", "1h", tmp_path / "e", now=now)
    assert not (tmp_path / "e").exists()


def test_import_stores_gaps_as_gaps(tmp_path):
    syn = D.synthetic_candles(50, start="2024-01-01")
    holed = syn.drop(syn.index[10:15])
    p, rep = D.import_candles(_write(tmp_path, "h.csv", holed), "BTC/USDT", "1h", tmp_path / "d")
    stored = D.load_candles(p)
    assert len(stored) == 45 and rep.gaps == 1 and rep.missing_candles == 5
    assert not stored.index.isin(syn.index[10:15]).any()                  # nothing invented


# ------------------------------------------------------------------ synthetic market
@pytest.mark.exclusive          # times the code: no other test runs meanwhile (conftest.py)
def test_synthetic_fast_deterministic_consistent():
    D.synthetic_candles(100)
    t0 = time.perf_counter()
    a = D.synthetic_candles()
    took = time.perf_counter() - t0
    assert took < 1.0, f"synthetic_candles(43,776) took {took:.2f} s"
    assert len(a) == 43_776 and a.attrs["source"] == "synthetic"
    pd.testing.assert_frame_equal(a, D.synthetic_candles())
    assert not a.equals(D.synthetic_candles(seed=8))
    o, h, lo, c = (a[k].to_numpy() for k in ["open", "high", "low", "close"])
    assert (o[1:] == c[:-1]).all() and o[0] == 10_000.0
    assert (h >= np.maximum(o, c)).all() and (lo <= np.minimum(o, c)).all() and (lo > 0).all()
    assert (a["volume"] > 0).all()
    rep = D.validate_candles(a, "1h")
    assert rep.ok and rep.gaps == 0 and rep.warnings == []


def test_synthetic_stylised_facts():
    a = D.synthetic_candles(seed=11)
    r = np.log(a["close"]).diff().dropna()
    assert abs(r.autocorr(1)) < 0.03
    assert r.abs().autocorr(1) > 0.15 and r.abs().autocorr(24) > 0.1
    assert r.kurt() + 3 > 5
    assert a["volume"].iloc[1:].corr(r.abs()) > 0.3
    by_hour = r.groupby(r.index.hour).std()
    assert 12 <= by_hour.idxmax() <= 17 and by_hour.max() / by_hour.min() > 1.4
    wkend = r.index.day_of_week >= 5
    assert r[wkend].std() < 0.9 * r[~wkend].std()
    vol_month = r.resample("30D").std()
    assert vol_month.max() / vol_month.min() > 2                            # regimes / clustering


@pytest.mark.parametrize("tf,n", [("5m", 2000), ("4h", 3000), ("1d", 2000)])
def test_synthetic_other_timeframes(tf, n):
    a = D.synthetic_candles(n, timeframe=tf)
    rep = D.validate_candles(a, tf)
    assert rep.ok and rep.spacing == D.timeframe_delta(tf) and len(a) == n


def test_synthetic_arguments():
    assert len(D.synthetic_candles(1)) == 1
    with pytest.raises(ValueError):
        D.synthetic_candles(0)
    with pytest.raises(ValueError, match="grid"):
        D.synthetic_candles(10, start="2020-01-01 00:30")


# ------------------------------------------------------------------ real shared data
def _independent_gaps(path):
    raw = pd.read_csv(path)
    t = pd.to_datetime(raw["timestamp"], utc=True).sort_values().reset_index(drop=True)
    step = t.diff().dropna()
    gaps = step[step > pd.Timedelta("1h")]
    return len(raw), t, len(gaps), int((gaps / pd.Timedelta("1h") - 1).sum()), gaps.max()


def test_real_spot_file_load_and_report():
    path = need(SPOT)
    n, t, n_gaps, n_missing, longest = _independent_gaps(path)
    assert (n, n_gaps, n_missing, longest) == (8_750, 6, 13, pd.Timedelta("6h"))     # what the README says
    df = D.load_candles(path)
    assert len(df) == 8_750 and df.index.is_monotonic_increasing and df.index.is_unique
    assert str(df.index.tz) == "UTC" and (df.index == pd.DatetimeIndex(t)).all()
    assert df.index[0] == pd.Timestamp("2019-12-10 23:00", tz="UTC")
    assert df.index[-1] == pd.Timestamp("2020-12-10 01:00", tz="UTC")
    assert df.loc["2020-12-10 00:00", "close"].item() == 18432.01            # newest-first row 2, parsed exactly
    rep = D.validate_candles(df, "1h")
    assert rep.ok and (rep.gaps, rep.missing_candles, rep.longest_gap) == (n_gaps, n_missing, longest)
    assert rep.longest_gap_start == pd.Timestamp("2020-02-19 12:00", tz="UTC") and rep.longest_gap_missing == 5
    assert rep.order == "newest first" and rep.out_of_order == 8_749 and rep.duplicates == 0
    assert rep.last_volume_ratio < 0.02 and any("recorded while still forming" in w for w in rep.warnings)
    assert rep.expected_rows == 8_763


def test_real_spot_import_round_trips(tmp_path):
    path = need(SPOT)
    data_dir = tmp_path / "data"
    p, rep = D.import_candles(path, "BTC/USDT", "1h", data_dir)
    assert p == data_dir / "raw" / "binance_BTC-USDT_1h.parquet" and p.read_bytes()[:4] == b"PAR1"
    assert rep.ok and rep.stored_rows == rep.added_rows == 8_750 and rep.gaps == 6
    stored = D.load_candles(p)
    pd.testing.assert_frame_equal(stored, D.load_candles(path))
    assert stored.attrs["source"] == "real:binance_BTC-USDT_1h.parquet"
    assert D.validate_candles(stored, "1h").gaps == 6
    # the parquet's own report: already sorted, no duplicates
    srep = D.validate_candles(stored, "1h")
    assert srep.order == "oldest first" and srep.out_of_order == 0
    assert "stored    8,750 candles (8,750 new)" in rep.summary()
    # importing it again adds nothing
    _, rep2 = D.import_candles(path, "BTC/USDT", "1h", data_dir)
    assert rep2.added_rows == 0 and rep2.stored_rows == 8_750


@pytest.mark.parametrize("path,tf,n", [(FUT1H, "1h", 43_776), (FUT4H, "4h", 10_944)])
def test_real_futures_files_are_clean(path, tf, n):
    df = D.load_candles(need(path))
    rep = D.validate_candles(df, tf)
    assert len(df) == n and rep.ok and rep.gaps == 0 and rep.duplicates == 0 and rep.order == "oldest first"
    assert rep.spacing == D.timeframe_delta(tf)


def test_real_4h_file_refused_as_1h(tmp_path):
    path = need(FUT4H)
    rep = D.validate_candles(D.load_candles(path), "1h")
    assert not rep.ok and rep.spacing_mismatch
    with pytest.raises(CandleDataError, match="spacing 4h is not the 1h timeframe"):
        D.import_candles(path, "BTC/USDT", "1h", tmp_path / "data")
    assert files_under(tmp_path / "data") == []


@pytest.mark.exclusive          # times the code: no other test runs meanwhile (conftest.py)
def test_load_speed_on_five_years():
    path = need(FUT1H)
    D.load_candles(path)
    t0 = time.perf_counter()
    df = D.load_candles(path)
    D.validate_candles(df, "1h")
    took = time.perf_counter() - t0
    assert took < 1.0, f"load + validate of 43,776 rows took {took:.2f} s"


def test_store_lock_serialises_writers(tmp_path):
    import threading
    syn = D.synthetic_candles(20, start="2024-01-01")
    src = _write(tmp_path, "a.csv", syn)
    store = D.raw_path(tmp_path / "d", "BTC/USDT", "1h")
    done = threading.Event()
    with D._store_lock(store):
        t = threading.Thread(target=lambda: (D.import_candles(src, "BTC/USDT", "1h", tmp_path / "d"), done.set()))
        t.start()
        assert not done.wait(0.3) and not store.exists()          # blocked while another writer holds the lock
    t.join(5)
    assert done.is_set() and len(D.load_candles(store)) == 20


def test_time_arguments():
    assert D._utc("1577836800000") == D._utc(1577836800) == pd.Timestamp("2020-01-01", tz="UTC")
    with pytest.raises(CandleDataError, match="since 'last tuesday' is not a time"):
        D._utc("last tuesday", "since")


# ------------------------------------------------------------------ non-finite values (issue 9, item 1)
_GOOD_ROWS = "".join(f"2024-03-01 {h:02d}:00:00,100,101,99,100.5,5\n" for h in range(5))
NON_FINITE = {                                   # the last row's values; each must be refused
    "prices_1e400": "2024-03-01 05:00:00,1e400,1e400,99,1e400,5\n",
    "prices_inf": "2024-03-01 05:00:00,inf,inf,99,inf,5\n",
    "high_inf": "2024-03-01 05:00:00,100,inf,99,100.5,5\n",
    "low_minus_inf": "2024-03-01 05:00:00,100,101,-inf,100.5,5\n",
    "volume_inf": "2024-03-01 05:00:00,100,101,99,100.5,inf\n",
    "volume_1e400": "2024-03-01 05:00:00,100,101,99,100.5,1e400\n",
}


@pytest.mark.parametrize("name", list(NON_FINITE))
def test_non_finite_values_are_refused_everywhere(tmp_path, name):
    src = tmp_path / f"{name}.csv"
    src.write_text(HEADER + _GOOD_ROWS + NON_FINITE[name])
    last = pd.Timestamp("2024-03-01 05:00", tz="UTC")
    rep = D.validate_candles(D.parse_candles(src), "1h", now=NOW)
    assert rep.non_finite >= 1 and not rep.ok and rep.first_at["non_finite"] == last
    assert "non-finite" in rep.refusal() and "non-finite" in rep.summary()
    with pytest.raises(CandleDataError) as e:              # import: one line, nothing written
        D.import_candles(src, "BTC/USDT", "1h", tmp_path / "data", now=NOW)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("refusing to import") and "non-finite" in msg and "nothing written" in msg
    assert files_under(tmp_path / "data") == []
    with pytest.raises(CandleDataError, match="non-finite") as e:   # every loader refuses it (emulator, backtest, ...)
        D.load_candles(src)
    assert "\n" not in str(e.value) and src.name in str(e.value) and "2024-03-01 05:00" in str(e.value)
    frame = D.parse_candles(src)
    with pytest.raises(CandleDataError, match="non-finite"):
        D.canonicalize(frame)
    ok = tmp_path / "ok.csv"
    ok.write_text(HEADER + _GOOD_ROWS)
    bad = D.load_candles(ok)
    bad.loc[bad.index[-1], "volume"] = np.inf
    with pytest.raises(CandleDataError, match="non-finite"):       # and the store never accepts one
        D.save_candles(bad, tmp_path / "x.parquet")
    assert not (tmp_path / "x.parquet").exists()


def test_finite_values_still_pass():
    rep = D.validate_candles(grid(8), "1h", now=NOW)
    assert rep.ok and rep.non_finite == 0 and "non_finite" not in rep.first_at


def test_a_fifo_is_refused_not_read(tmp_path):
    "A FIFO (or any non-regular file) is refused at once: reading one would block forever (run in a subprocess)."
    fifo = tmp_path / "candles.csv"
    os.mkfifo(fifo)
    code = ("import sys\nfrom cryptobot import data as D\n"
            "for f in (D.load_candles, lambda p: D.import_candles(p, 'BTC/USDT', '1h', sys.argv[2])):\n"
            "    try:\n        f(sys.argv[1])\n    except D.CandleDataError as e:\n        print(e)\n")
    r = subprocess.run([sys.executable, "-c", code, str(fifo), str(tmp_path / "data")], capture_output=True,
                       text=True, timeout=30)
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and len(lines) == 2, r.stdout + r.stderr
    assert all(str(fifo) in l and "not a regular file" in l for l in lines), lines
    assert files_under(tmp_path / "data") == []


def test_check_finite_is_one_line_and_names_the_first_cell():
    df = grid(6)
    D.check_finite(df, "ok")                                               # finite: silent
    df.loc[df.index[4], "volume"] = np.nan
    df.loc[df.index[2], "low"] = -np.inf
    with pytest.raises(CandleDataError) as e:
        D.check_finite(df, "poll", "no trade")
    assert str(e.value) == "poll: 2 non-finite value(s) (first 2024-03-01 02:00 UTC: low=-inf); no trade"
    D.check_finite(df.drop(df.index[2]), "nan allowed", nan=False)         # canonicalize leaves NaN to the report
