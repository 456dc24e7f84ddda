"""cryptobot.features: fingerprint stability/sensitivity (subprocesses), atomic parquet output, input validation,
edge cases (flat candles, zero volume), notebook table in sync, speed on 43,776 candles, lean fresh import."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryptobot import features as F

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def _candles(n=1_500, seed=5, price=20_000.0):
    rng = np.random.default_rng(seed)
    c = price * np.exp(np.cumsum(rng.normal(0, 0.005, n)))
    o = np.r_[price, c[:-1]]
    h = np.maximum(o, c) * np.exp(np.abs(rng.normal(0, 0.002, n)))
    l = np.minimum(o, c) * np.exp(-np.abs(rng.normal(0, 0.002, n)))
    idx = pd.date_range("2023-03-01", periods=n, freq="h", tz="UTC", name="timestamp")
    df = pd.DataFrame({"open": o, "high": h, "low": l, "close": c, "volume": rng.lognormal(5, 0.7, n)}, index=idx)
    df.attrs["source"] = "synthetic"
    return df


def _run(code: str, **env) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


# ---------------------------------------------------------------- fingerprint
def test_fingerprint_stable_across_processes():
    fp = F.fingerprint()
    assert len(fp) == 64 and int(fp, 16) >= 0
    code = "import cryptobot.features as f; print(f.fingerprint())"
    assert _run(code, PYTHONHASHSEED="1") == _run(code, PYTHONHASHSEED="987") == fp


@pytest.mark.parametrize("change", [
    lambda m: m.setitem(F.PARAMS, "rsi_window", 21),
    lambda m: m.setitem(F.PARAMS, "sma_windows", [24, 72, 168, 500]),
    lambda m: m.setattr(F, "FEATURE_VERSION", "1H_advanced/2"),
    lambda m: m.setattr(F, "LOOKBACK", F.LOOKBACK + 1),
    lambda m: m.setattr(F, "FEATURE_NAMES", F.FEATURE_NAMES[::-1]),
    lambda m: m.setattr(F, "ATOL", 1e-10),
])
def test_fingerprint_changes_with_the_spec(monkeypatch, change):
    before = F.fingerprint()
    change(monkeypatch)
    assert F.fingerprint() != before


def _module_from_source(tmp_path, name, source):
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fingerprint_changes_when_a_feature_function_changes(tmp_path, monkeypatch):
    src = Path(F.__file__).read_text()
    old = 'out["macd_hist"] = (macd - signal) / c'
    assert old in src
    mod = _module_from_source(tmp_path, "features_mod", src.replace(old, 'out["macd_hist"] = (macd - signal) / c * 1.0'))
    before = F.fingerprint()
    monkeypatch.setattr(F, "_momentum", mod._momentum)
    assert F.fingerprint() != before
    monkeypatch.undo()
    assert F.fingerprint() == before


def test_fingerprint_ignores_cell_markers_and_unrelated_code(tmp_path):
    "Moving notebook cells renumbers the generated file's markers; adding non-feature code must not matter either."
    src = Path(F.__file__).read_text()
    assert "# %% ../nbs/04_features.ipynb" in src
    moved = src.replace("# %% ../nbs/04_features.ipynb", "# %% ../nbs/04_features.ipynb #moved") + "\n\ndef unrelated():\n    return 1\n"
    mod = _module_from_source(tmp_path, "features_moved", "# a new first line\n\n" + moved)
    assert mod.fingerprint() == F.fingerprint()
    assert not any("# %%" in s for s in F._feature_spec()["source"].values())


# ---------------------------------------------------------------- write_features
def test_write_features_atomic_with_metadata(tmp_path):
    candles = _candles(800)
    candles.attrs["source"] = "real:binance_BTC-USDT_1h"
    path = F.features_path(tmp_path / "data")
    assert path == tmp_path / "data" / "features" / "features_1H_advanced.parquet"
    assert F.write_features(candles, path) == path
    assert sorted(p.name for p in path.parent.iterdir()) == ["features_1H_advanced.parquet"]     # no temp left
    meta = F.read_feature_meta(path)
    assert meta["fingerprint"] == F.fingerprint() and meta["lookback"] == F.LOOKBACK == 603
    assert meta["source"] == "real:binance_BTC-USDT_1h" and meta["names"] == F.FEATURE_NAMES and meta["rows"] == 800
    back = pd.read_parquet(path)
    assert back.equals(F.build_features(candles)) and back.index.equals(candles.index)
    # no source attr -> "unknown"
    plain = _candles(50)
    plain.attrs.clear()
    assert F.read_feature_meta(F.write_features(plain, tmp_path / "x.parquet"))["source"] == "unknown"


def test_write_features_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "features" / F.FEATURES_FILENAME
    F.write_features(_candles(300), path)
    before = path.read_bytes()
    import pyarrow.parquet as pq

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(pq, "write_table", boom)
    with pytest.raises(OSError, match="disk full"):
        F.write_features(_candles(400), path)
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == [F.FEATURES_FILENAME]


def test_read_feature_meta_refuses_foreign_parquet(tmp_path):
    p = tmp_path / "other.parquet"
    pd.DataFrame({"a": [1.0]}).to_parquet(p)
    with pytest.raises(F.FeatureError, match="no cryptobot feature metadata"):
        F.read_feature_meta(p)


def test_check_fingerprint():
    F.check_fingerprint(F.fingerprint())
    with pytest.raises(F.FeatureError, match="retrain"):
        F.check_fingerprint("f" * 64)


# ---------------------------------------------------------------- input validation
def _bad(kind):
    df = _candles(100)
    if kind == "unsorted":
        return df.iloc[::-1], "not strictly increasing"
    if kind == "duplicate":
        return pd.concat([df.iloc[:50], df.iloc[49:]]), "not strictly increasing"
    if kind == "naive":
        return df.tz_localize(None), "tz-aware"
    if kind == "range_index":
        return df.reset_index(drop=True), "tz-aware"
    if kind == "missing":
        return df.drop(columns=["high"]), "lack column"
    if kind == "nan":
        df.iloc[10, 3] = np.nan
        return df, "NaN or inf"
    if kind == "inf":
        df.iloc[10, 4] = np.inf
        return df, "NaN or inf"
    if kind == "zero_price":
        df.iloc[10, :4] = 0.0
        return df, "non-positive price"
    if kind == "neg_volume":
        df.iloc[10, 4] = -1.0
        return df, "negative volume"
    if kind == "ohlc":
        df.iloc[10, 1] = df.iloc[10, 2] * 0.99
        return df, "inconsistent OHLC"
    if kind == "text":
        return df.astype({"close": object}).assign(close="x"), "numeric"
    if kind == "series":
        return df["close"], "DataFrame"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["unsorted", "duplicate", "naive", "range_index", "missing", "nan", "inf",
                                  "zero_price", "neg_volume", "ohlc", "text", "series"])
def test_bad_input_raises_one_clear_line(kind):
    df, text = _bad(kind)
    with pytest.raises(ValueError, match=text) as e:
        F.build_features(df)
    assert isinstance(e.value, F.FeatureError) and "\n" not in str(e.value)


def test_accepts_extra_columns_ints_and_short_input():
    df = _candles(30)
    extra = df.assign(trades=1, quote_av=2.0)
    assert F.build_features(extra).equals(F.build_features(df))
    ints = df.round(0).astype({"volume": "int64"})
    out = F.build_features(ints)
    assert (out.dtypes == np.float64).all() and out.index.equals(df.index)
    assert F.build_features(df.iloc[:1]).shape == (1, len(F.FEATURE_NAMES))
    assert F.build_features(df.iloc[:0]).shape == (0, len(F.FEATURE_NAMES))
    # a non-UTC tz-aware index: calendar features are still UTC
    tokyo = df.tz_convert("Asia/Tokyo")
    assert np.allclose(F.build_features(tokyo)[["hour_sin", "hour_cos"]], F.build_features(df)[["hour_sin", "hour_cos"]])


# ---------------------------------------------------------------- edge cases
def test_flat_and_dead_market_never_inf():
    df = _candles(1_500)
    df.iloc[700:1_200, :4] = df["close"].iloc[699]          # 500 flat candles, no trades
    df.iloc[700:1_200, 4] = 0.0
    X = F.build_features(df)
    assert not np.isinf(X.to_numpy()).any()
    for name, wu in F.WARMUP.items():
        assert not X[name].iloc[wu:].isna().any(), name
    row = X.iloc[1_199]
    assert row[["body", "upper_wick", "lower_wick", "clv"]].tolist() == [0.0, 0.0, 0.0, 0.5]
    assert row["stoch_k_14"] == 0.5 and row["rv_168"] == 0.0 and row["vol_ratio_24_168"] == 1.0
    assert row["rel_vol_168"] == 1.0 and row["logvol_z_168"] == 0.0 and row["er_24"] == 0.0
    assert row["rsi_14"] == 50.0          # 500 flat hours: Wilder averages (13/14)^500 ~ 1e-16 fell below ATOL
    # just after the dead stretch a trade arrives: relative volume is large but finite
    assert np.isfinite(X["rel_vol_24"].iloc[1_200]) and X["rel_vol_24"].iloc[1_200] > 1


def test_scale_free():
    df = _candles(1_000)
    big = df.copy()
    big[["open", "high", "low", "close"]] *= 37.0
    big["volume"] /= 37.0
    assert np.allclose(F.build_features(big), F.build_features(df), rtol=1e-7, atol=1e-9, equal_nan=True)


def test_deterministic_across_processes(tmp_path):
    df = _candles(900)
    df.to_pickle(tmp_path / "c.pkl")
    code = ("import hashlib, pandas as pd, cryptobot.features as f; "
            f"x = f.build_features(pd.read_pickle(r'{tmp_path / 'c.pkl'}')); "
            "print(hashlib.sha256(x.to_numpy().tobytes()).hexdigest())")
    import hashlib
    assert _run(code) == hashlib.sha256(F.build_features(df).to_numpy().tobytes()).hexdigest()


# ---------------------------------------------------------------- notebook documentation in sync
def test_notebook_feature_table_matches_the_code():
    nb = json.loads((ROOT / "nbs" / "04_features.ipynb").read_text())
    rows = {}
    for cell in nb["cells"]:
        if cell["cell_type"] != "markdown":
            continue
        for line in "".join(cell["source"]).splitlines():
            parts = [p.strip() for p in re.split(r"(?<!\\)\|", line.strip().strip("|"))]   # "\|" is a literal bar
            if line.startswith("|") and parts[0] in F.FEATURE_NAMES:
                rows[parts[0]] = parts
    assert list(rows) == F.FEATURE_NAMES, "the notebook's feature table must list FEATURE_NAMES in order"
    for name, parts in rows.items():
        assert int(parts[4]) == F.WARMUP[name], f"{name}: table says warm-up {parts[4]}, code {F.WARMUP[name]}"


def test_ohlcv_matches_the_data_contract():
    from cryptobot import data
    assert F.OHLCV == list(data.OHLCV)


def test_on_the_data_modules_synthetic_market():
    from cryptobot.data import synthetic_candles
    candles = synthetic_candles(3_000, seed=3)
    X = F.build_features(candles)
    assert X.index.equals(candles.index) and not np.isinf(X.to_numpy()).any()
    assert X.isna().any(axis=1).sum() == F.LOOKBACK - 1 and not X.iloc[F.LOOKBACK - 1:].isna().any().any()


# ---------------------------------------------------------------- speed and import
def test_fresh_import_is_lean():
    code = ("import json, sys, time; t0 = time.perf_counter(); import cryptobot.features; dt = time.perf_counter() - t0; "
            "heavy = [m for m in ('vectorbt', 'sklearn', 'plotly', 'matplotlib', 'papermill', 'ccxt', 'numba') "
            "if m in sys.modules]; print(json.dumps([dt, heavy]))")
    # Speed is measured by `cryptobot bench` (import_features_s), never asserted in a test; what is asserted is
    # deterministic: the feature module pulls in none of the heavy research or exchange libraries.
    dt, heavy = json.loads(_run(code))
    assert heavy == [], f"import cryptobot.features pulled in {heavy}"
    print(f"fresh import cryptobot.features: {dt:.2f} s")
