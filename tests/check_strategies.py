"""User strategies for tests/test_strategy_check.py (importable as `check_strategies:Class`): the usual bugs, one
class each, and sound ones. The check must find the bugs by what the classes output, never by their source."""
import numpy as np
import pandas as pd

from cryptobot.strategy import Param, Strategy, crossed_above, ema, ewm_warmup


class _W50(Strategy):
    @property
    def warmup(self):
        return 50


# ---- look-ahead ----
class NextOpen(_W50):
    "Enters when the next bar closes above its open: shift(-1) of open and close."
    def signals(self, c, f=None):
        green = c["close"].shift(-1) > c["open"].shift(-1)
        return green, ~green


class NextClose(_W50):
    "shift(-1) of close."
    def signals(self, c, f=None):
        r = c["close"].shift(-1) / c["close"] - 1
        return (r > 0.003).fillna(False), (r < -0.003).fillna(False)


class ExitPeeks(_W50):
    "A sound entry; the exit reads the close three bars ahead."
    def signals(self, c, f=None):
        ma = c["close"].rolling(20).mean()
        return crossed_above(c["close"], ma), (c["close"].shift(-3) < c["close"] * 0.99).fillna(False)


class Centred(_W50):
    "rolling(center=True)."
    def signals(self, c, f=None):
        ma = c["close"].rolling(21, center=True).mean()
        return crossed_above(c["close"], ma), crossed_above(ma, c["close"])


class WholeSample(_W50):
    "A threshold from the whole sample's mean and standard deviation of returns."
    def signals(self, c, f=None):
        r = c["close"].pct_change()
        z = (r - r.mean()) / r.std()
        return (z < -2).fillna(False), (z > 2).fillna(False)


class DailyHigh(_W50):
    "resample('1D').max() spread back over the day: enters at the day's high."
    def signals(self, c, f=None):
        day = c["high"].resample("1D").max().reindex(c.index, method="ffill")
        return c["high"] >= day, (c["low"] <= c["low"].rolling(24).min()).fillna(False)


class Backfilled(_W50):
    "A 4-hour close, bfill()ed onto the hours before it."
    def signals(self, c, f=None):
        h4 = c["close"].resample("4h").last().reindex(c.index).bfill()
        return (h4 > c["close"] * 1.003).fillna(False), (h4 < c["close"] * 0.997).fillna(False)


class LastClose(_W50):
    "Compares with the last close of the data (iloc[-1])."
    def signals(self, c, f=None):
        last = c["close"].iloc[-1]
        return c["close"] < last * 0.97, c["close"] > last * 1.03


class Smoothed(_W50):
    "np.convolve(mode='same'): a centred smoother."
    def signals(self, c, f=None):
        sm = pd.Series(np.convolve(c["close"].to_numpy(), np.ones(9) / 9, mode="same"), index=c.index)
        return crossed_above(c["close"], sm), crossed_above(sm, c["close"])


# ---- warm-up ----
class ShortEma(Strategy):
    "An EMA cross declaring `slow` candles of warm-up (the EMA needs many more)."
    params = {"fast": Param(int, 12, 2, 200), "slow": Param(int, 26, 3, 400)}

    @property
    def warmup(self):
        return self.slow

    def signals(self, c, f=None):
        a, b = ema(c["close"], self.fast), ema(c["close"], self.slow)
        return crossed_above(a, b), crossed_above(b, a)


class NoWarmup(Strategy):
    "The same EMA cross, warmup not overridden (1)."
    params = ShortEma.params
    signals = ShortEma.signals


class AdjustedEwm(Strategy):
    "ewm(adjust=True) with the span as warm-up."
    @property
    def warmup(self):
        return 30

    def signals(self, c, f=None):
        a, b = c["close"].ewm(span=10).mean(), c["close"].ewm(span=30).mean()
        return crossed_above(a, b), crossed_above(b, a)


class ShortRsi(Strategy):
    "Wilder's RSI (an EWM) with `period` bars of warm-up."
    @property
    def warmup(self):
        return 15

    def signals(self, c, f=None):
        d = c["close"].diff()
        g = d.clip(lower=0).ewm(alpha=1 / 14, adjust=False).mean()
        l = (-d).clip(lower=0).ewm(alpha=1 / 14, adjust=False).mean()
        r = 100 * g / (g + l)
        return crossed_above(r, 30 + 0 * r), crossed_above(r, 70 + 0 * r)


# ---- memory ----
class Anchored(_W50):
    "A 2 % grid of levels anchored on the first candle's close (iloc[0]): enter on crossing one up, exit down."
    def signals(self, c, f=None):
        g = np.floor(np.log(c["close"] / c["close"].iloc[0]) / 0.02)
        return g > g.shift(1), g < g.shift(1)


class AllTimeHigh(_W50):
    "Drawdown from the all-time high (cummax): infinite memory."
    def signals(self, c, f=None):
        dd = c["close"] / c["close"].cummax() - 1
        return crossed_above(-dd, 0.05 + 0 * dd), crossed_above(dd, -0.01 + 0 * dd)


# ---- determinism and outputs ----
class Noisy(Strategy):
    "Unseeded randomness."
    def signals(self, c, f=None):
        r = np.random.random(len(c))
        return pd.Series(r < 0.05, index=c.index), pd.Series(r > 0.95, index=c.index)


class NanOut(_W50):
    "Leaves NaN in its warm-up (object Series)."
    def signals(self, c, f=None):
        ma = c["close"].rolling(20).mean()
        e = (c["close"] > ma).astype(object).where(ma.notna())
        return e, e.isna() & False


class FloatOut(_W50):
    "Returns 0.0/1.0 floats."
    def signals(self, c, f=None):
        ma = c["close"].rolling(20).mean()
        return (c["close"] > ma).astype(float), (c["close"] < ma).astype(float)


class Misaligned(_W50):
    "Returns Series on a reset (integer) index."
    def signals(self, c, f=None):
        ma = c["close"].rolling(20).mean()
        return (c["close"] > ma).reset_index(drop=True), (c["close"] < ma).reset_index(drop=True)


# ---- sound ----
class SoundEma(Strategy):
    "A user's EMA cross with an honest warm-up."
    params = {"fast": Param(int, 12, 2, 200), "slow": Param(int, 26, 3, 400)}

    @property
    def warmup(self):
        return ewm_warmup(2 / (self.slow + 1)) + 1

    def signals(self, c, f=None):
        a = c["close"].ewm(span=self.fast, adjust=False).mean()
        b = c["close"].ewm(span=self.slow, adjust=False).mean()
        return (a > b) & (a.shift() <= b.shift()), (a < b) & (a.shift() >= b.shift())


class Bollinger(Strategy):
    "Bollinger reversion: enter when the close crosses back above the lower band, exit above the middle."
    params = {"period": Param(int, 20, 2, 200), "k": Param(float, 2.0, 0.5, 5.0)}

    @property
    def warmup(self):
        return self.period + 1

    def signals(self, c, f=None):
        m = c["close"].rolling(self.period).mean()
        sd = c["close"].rolling(self.period).std()
        lo = m - self.k * sd
        return crossed_above(c["close"], lo), c["close"] > m


class Donchian(Strategy):
    "Breakout over the previous `n` highs, out under the previous `n` lows."
    params = {"n": Param(int, 20, 2, 500)}

    @property
    def warmup(self):
        return self.n + 1

    def signals(self, c, f=None):
        hi = c["high"].rolling(self.n).max().shift(1)
        lo = c["low"].rolling(self.n).min().shift(1)
        return c["close"] > hi, c["close"] < lo


class DailyPrev(Strategy):
    "Yesterday's high (a resample done right: the closed day, shifted)."
    @property
    def warmup(self):
        return 49

    def signals(self, c, f=None):
        prev = c["high"].resample("1D").max().shift(1).reindex(c.index, method="ffill")
        return crossed_above(c["close"], prev).fillna(False), (c["close"] < c["close"].rolling(24).mean()).fillna(False)


class FeatureRule(Strategy):
    "Reads the RSI column of build_features: enter under 30, exit over 70."
    uses_features = True

    def signals(self, c, f=None):
        x = f["rsi_14"]
        return (x < 30).fillna(False), (x > 70).fillna(False)


class Seeded(Strategy):
    "Randomness from a fixed seed per candle time: deterministic and causal."
    def signals(self, c, f=None):
        u = (c.index.asi8 // 3_600_000_000_000 * 2654435761 % 2**32) / 2**32
        return pd.Series(u < 0.05, index=c.index), pd.Series(u > 0.95, index=c.index)
