"""Causality of `cryptobot.features.build_features` on the REAL 2020 spot year (newest first in the file, 6 gaps).

(a) the last row of a prefix candles[:t+1] equals the full run's row t;
(b) the last row of the trailing LOOKBACK candles candles[t-LOOKBACK+1:t+1] equals row t;
(c) perturbing every candle after t changes no row <= t.
Equality: np.isclose(rtol=1e-9, atol=1e-12) and identical NaN positions. Skips when the data folder is absent.
"""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryptobot import features as F

SPOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "binance-spot_BTCUSDT_1h_2019-12-10_2020-12-10.csv"
N_T = 200           # random t per check
RTOL, ATOL = 1e-9, 1e-12


@pytest.fixture(scope="module")
def spot():
    if not SPOT.exists():
        pytest.skip(f"real data absent: {SPOT} not found (the shared data folder lives beside the repo as ../shared/data)")
    from cryptobot.data import load_candles
    candles = load_candles(SPOT)
    assert len(candles) == 8_750 and candles.index.is_monotonic_increasing
    return candles


@pytest.fixture(scope="module")
def full(spot):
    return F.build_features(spot)


def _assert_same(got: np.ndarray, want: np.ndarray, ctx: str):
    ng, nw = np.isnan(got), np.isnan(want)
    names = np.array(F.FEATURE_NAMES)
    assert np.array_equal(ng, nw), f"{ctx}: NaN differs in {list(names[(ng != nw).any(axis=0) if got.ndim == 2 else ng != nw])}"
    ok = np.isclose(got, want, rtol=RTOL, atol=ATOL) | ng
    if not ok.all():
        bad = ~ok if got.ndim == 1 else ~ok.all(axis=0)
        raise AssertionError(f"{ctx}: {list(names[bad])} differ: got {got[~ok][:3]}, want {want[~ok][:3]}")


def _random_t(n, lo, seed):
    return np.random.default_rng(seed).choice(np.arange(lo, n), size=N_T, replace=False)


def test_prefix_last_row_equals_full_row(spot, full):
    want = full.to_numpy()
    ts = _random_t(len(spot), 0, seed=11)
    assert (ts < F.LOOKBACK).any() and (ts >= F.LOOKBACK).any()        # warm-up rows and complete rows both covered
    for t in ts:
        got = F.build_features(spot.iloc[: t + 1])
        assert got.index.equals(spot.index[: t + 1])
        _assert_same(got.iloc[-1].to_numpy(), want[t], f"prefix t={t}")


# EWM-based features have infinite memory: equal within EWM_TOL; every other feature is computed from its finite
# window alone and must be bit-identical.
EWM_BASED = ["atr_14", "rsi_14", "macd_line", "macd_signal", "macd_hist"]


def test_lookback_window_reproduces_full_row(spot, full):
    want = full.to_numpy()
    assert set(EWM_BASED) <= set(F.FEATURE_NAMES)
    finite = np.array([n not in EWM_BASED for n in F.FEATURE_NAMES])
    worst = 0.0
    for t in _random_t(len(spot), F.LOOKBACK - 1, seed=12):
        window = spot.iloc[t - F.LOOKBACK + 1: t + 1]
        assert len(window) == F.LOOKBACK
        got = F.build_features(window).iloc[-1].to_numpy()
        assert not np.isnan(got).any(), f"t={t}: LOOKBACK candles leave NaN in the last row"
        _assert_same(got, want[t], f"lookback t={t}")
        assert np.array_equal(got[finite], want[t][finite]), f"t={t}: a finite-window feature is not bit-identical"
        worst = max(worst, float(np.max(np.abs(got - want[t]) / np.maximum(np.abs(want[t]), 1e-300))))
    print(f"worst relative difference, LOOKBACK window vs full history: {worst:.2e}")


def test_lookback_is_tight(spot):
    "One candle fewer than LOOKBACK must leave the last row incomplete (else LOOKBACK is larger than needed)."
    for t in _random_t(len(spot), F.LOOKBACK, seed=13)[:20]:
        assert F.build_features(spot.iloc[t - F.LOOKBACK + 2: t + 1]).iloc[-1].isna().any()


def test_perturbing_the_future_changes_no_past_row(spot, full):
    want = full.to_numpy()
    rng = np.random.default_rng(14)
    ts = _random_t(len(spot) - 1, 0, seed=14)                          # t < n-1: there is a future to perturb
    prices = spot[["open", "high", "low", "close"]].to_numpy()
    vol = spot["volume"].to_numpy()
    for t in ts:
        k = len(spot) - t - 1
        p = prices.copy()
        v = vol.copy()
        # new future candles: every price scaled by a per-candle factor (OHLC stays consistent), close moved
        # inside the candle's range, volume rescaled
        p[t + 1:] *= rng.uniform(0.5, 2.0, (k, 1))
        lo, hi = p[t + 1:, 2], p[t + 1:, 1]
        p[t + 1:, 3] = lo + rng.uniform(0, 1, k) * (hi - lo)
        v[t + 1:] *= rng.uniform(0.0, 3.0, k)
        other = pd.DataFrame(np.column_stack([p, v]), index=spot.index, columns=F.OHLCV)
        got = F.build_features(other).to_numpy()
        _assert_same(got[: t + 1], want[: t + 1], f"perturbed after t={t}")
        # everything runs forward in time, so the past is not merely close but bit-identical
        assert np.array_equal(got[: t + 1], want[: t + 1], equal_nan=True), f"t={t}: past rows changed in the last bits"
        assert not np.array_equal(got[t + 1:], want[t + 1:], equal_nan=True), f"t={t}: perturbation had no effect"


def test_real_data_properties(spot, full):
    X = full
    assert len(F.FEATURE_NAMES) >= 25 and list(X.columns) == F.FEATURE_NAMES
    assert X.index.equals(spot.index) and (X.dtypes == np.float64).all()
    assert not np.isinf(X.to_numpy()).any()
    for name, wu in F.WARMUP.items():                                  # NaN exactly in the warm-up rows
        na = X[name].isna().to_numpy()
        assert na[:wu].all() and not na[wu:].any(), f"{name}: warm-up {wu}, NaN rows {np.flatnonzero(na)[-3:]}"
    rows_with_nan = X.isna().any(axis=1).to_numpy()
    assert rows_with_nan.sum() == F.LOOKBACK - 1 == max(F.WARMUP.values()) and not rows_with_nan[F.LOOKBACK - 1:].any()
    assert F.build_features(spot).equals(X)                             # deterministic


def test_gaps_are_rows_not_hours(spot, full):
    "Across a data gap, row-based features span the gap: ret_1 is the return since the previous ROW's close."
    gaps = np.flatnonzero(spot.index[1:] - spot.index[:-1] > pd.Timedelta("1h")) + 1
    assert len(gaps) == 6, "the spot file has 6 real gaps"
    for i in gaps:
        assert full["ret_1"].iloc[i] == pytest.approx(np.log(spot["close"].iloc[i] / spot["close"].iloc[i - 1]), rel=1e-12)
        assert full["hour_sin"].iloc[i] == pytest.approx(np.sin(2 * np.pi * spot.index[i].hour / 24), abs=1e-15)
