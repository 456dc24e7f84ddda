"""Test candles shared by the tests: a quiet synthetic frame, and the real 5-year file from ../shared/data."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REAL_5Y = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "binance-usdm_BTCUSDT_1h_2020-09-13_2025-09-11.csv"


def real_candles() -> pd.DataFrame:
    "The real 5-year hourly file through the project's loader; the calling test skips when ../shared/data is absent."
    if not REAL_5Y.exists():
        pytest.skip(f"real data absent: {REAL_5Y} (../shared/data)")
    from cryptobot.data import load_candles
    return load_candles(REAL_5Y)

N = 1100          # bars; the emulator starts at bar 1000 (just opened)


def frame(n: int = N) -> pd.DataFrame:
    "Quiet hourly candles around 30 000: lows 0.3 % under the open, so a 1.5 % stop holds unless a test shapes a bar."
    idx = pd.date_range("2024-01-01", periods=n, freq="1h", tz="UTC", name="timestamp")
    p = np.round(30_000 * (1 + 0.002 * np.sin(np.arange(n) / 7)), 2)
    df = pd.DataFrame({"open": p, "high": p * 1.003, "low": p * 0.997, "close": p * 1.001,
                       "volume": np.full(n, 12.0)}, index=idx)
    df.attrs["source"] = "test"
    return df
