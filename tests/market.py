"""Test candles shared by the emulator and exchange tests."""
import numpy as np
import pandas as pd

N = 1100          # bars; the emulator starts at bar 1000 (just opened)


def frame(n: int = N) -> pd.DataFrame:
    "Quiet hourly candles around 30 000: lows 0.3 % under the open, so a 1.5 % stop holds unless a test shapes a bar."
    idx = pd.date_range("2024-01-01", periods=n, freq="1h", tz="UTC", name="timestamp")
    p = np.round(30_000 * (1 + 0.002 * np.sin(np.arange(n) / 7)), 2)
    df = pd.DataFrame({"open": p, "high": p * 1.003, "low": p * 0.997, "close": p * 1.001,
                       "volume": np.full(n, 12.0)}, index=idx)
    df.attrs["source"] = "test"
    return df
