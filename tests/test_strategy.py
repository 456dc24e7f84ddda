"""cryptobot.strategy: the live runner's per-bar decision equals the vectorised pass, on every bar of the real file."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryptobot.strategy import (ENTER, EXIT, FLAT, HOLD, EmaCross, RsiReversion,
                                StrategyError, checked_signals, make_strategy, required_window, resolve)

from cryptobot.model import ModelStrategy
from market import real_candles


@pytest.fixture(scope="module")
def real():
    return real_candles()


def _signal_positions(enter, exit_):
    "In-position flag at each close, from the signals alone (what the runner is asked at that bar)."
    pos, out = False, np.zeros(len(enter), bool)
    for t in range(len(enter)):
        out[t] = pos
        if pos and exit_[t]:
            pos = False
        elif not pos and enter[t] and not exit_[t]:
            pos = True
    return out


def _check_every_bar(strategy, candles, features=None, step=1):
    enter, exit_ = checked_signals(strategy, candles, features)
    inpos = _signal_positions(enter, exit_)
    W = required_window(strategy)
    diffs = []
    for t in range(W - 1, len(candles), step):
        win = candles.iloc[t - W + 1: t + 1]
        fw = None if features is None else features.iloc[t - W + 1: t + 1]
        d = strategy.decide(win, fw, in_position=bool(inpos[t]))
        want = (EXIT if exit_[t] else HOLD) if inpos[t] else (ENTER if enter[t] and not exit_[t] else FLAT)
        if d != want:
            diffs.append((candles.index[t], str(d), want))
    return diffs, int(enter.sum()), int(exit_.sum()), int(inpos.sum())


@pytest.mark.parametrize("strategy", [EmaCross(fast=12, slow=26), RsiReversion(period=14, lower=30, upper=70)],
                         ids=["ema_cross", "rsi_reversion"])   # the cross rule: check_strategy in its own test
def test_decide_on_the_trailing_window_equals_the_vectorised_pass_on_every_real_bar(real, strategy):
    diffs, n_enter, n_exit, n_in = _check_every_bar(strategy, real)
    assert n_enter > 100 and n_exit > 100 and 1000 < n_in < len(real) - 1000   # both states and both signals occur
    assert diffs == [], f"{len(diffs)} bars decide differently live, first {diffs[:3]}"


def test_a_window_shorter_than_the_warmup_can_decide_differently(real):
    "Why `warmup` exists: with a 60-bar window, EMA(26) crosses are not those of the full history."
    s = EmaCross(fast=12, slow=26)
    enter, _ = checked_signals(s, real)
    short = [checked_signals(s, real.iloc[t - 59: t + 1])[0][-1] for t in range(1000, 20_000)]
    assert sum(a != b for a, b in zip(short, enter[1000:20_000])) > 0


def test_model_strategy_decides_like_the_vectorised_pass(real, tmp_path):
    "A real (small) model trained on the first two years, lean predictor, features from each trailing window."
    from cryptobot.features import build_features
    from cryptobot.model import TreeEnsemble, fit_classifier, make_labels
    cd = real.iloc[:20_000]
    feats = build_features(cd)
    y = make_labels(cd)
    ok = feats.notna().all(axis=1) & y.notna()
    clf = fit_classifier(feats[ok].to_numpy(), y[ok].to_numpy(), dict(max_iter=30))
    lean = TreeEnsemble.from_model(clf)                  # the live runner's predictor (no scikit-learn)

    class Model:
        model_id = "small-test-model"
        def predict_proba(self, f):
            X = f.to_numpy("float64")
            p = np.full(len(f), np.nan)
            good = ~np.isnan(X).any(axis=1)
            if good.any():
                p[good] = lean.predict_proba(X[good])[:, 1]
            return pd.Series(p, index=f.index)

    s = ModelStrategy(model=Model(), entry_threshold=0.55, exit_threshold=0.45)
    span = real.iloc[18_000:21_000]                       # beyond the training rows too
    diffs, n_enter, n_exit, _ = _check_every_bar(s, span, build_features(span), step=3)
    assert n_enter > 0 and n_exit > 0
    assert diffs == [], f"{len(diffs)} bars decide differently live, first {diffs[:3]}"


def test_parameters_are_typed_and_bounded():
    with pytest.raises(StrategyError, match=r"EmaCross: slow=1000 out of range: need int 3 <= slow <= 400"):
        EmaCross(slow=1000)
    with pytest.raises(StrategyError, match="fast=30 must be below slow=26"):
        make_strategy("ema_cross", {"fast": "30"})
    with pytest.raises(StrategyError, match="lower=50 must be below upper=50"):
        RsiReversion(lower=50, upper=50)
    with pytest.raises(StrategyError, match="max_hold=0 out of range"):
        EmaCross(max_hold=0)


def test_user_strategy_by_module_path_and_fingerprint(tmp_path, monkeypatch):
    (tmp_path / "my_strats.py").write_text(
        "from cryptobot.strategy import Strategy, Param\n"
        "class Breakout(Strategy):\n"
        "    params = {'n': Param(int, 20, 2, 500)}\n"
        "    @property\n"
        "    def warmup(self): return self.n + 1\n"
        "    def signals(self, candles, features=None):\n"
        "        hi = candles['high'].rolling(self.n).max().shift(1)\n"
        "        lo = candles['low'].rolling(self.n).min().shift(1)\n"
        "        return candles['close'] > hi, candles['close'] < lo\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cls = resolve("my_strats:Breakout")
    s = make_strategy("my_strats:Breakout", {"n": "10"})
    assert isinstance(s, cls) and s.n == 10 and required_window(s) == 11
    assert s.fingerprint() != make_strategy("my_strats:Breakout", {"n": "11"}).fingerprint()
    # the fingerprint is the same in another process (class source + parameters, no memory addresses)
    code = ("import sys; sys.path.insert(0, %r); from cryptobot.strategy import make_strategy; "
            "print(make_strategy('my_strats:Breakout', {'n': '10'}).fingerprint())" % str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == s.fingerprint()


def test_strategy_module_stays_light():
    code = ("import sys, cryptobot.strategy; "
            "print([m for m in ('sklearn', 'vectorbt', 'numba', 'plotly') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_cli_finds_a_strategy_module_in_the_current_directory_as_python_m_would(tmp_path):
    "`cryptobot backtest --strategy mymod:MyClass` run beside mymod.py (the console script's path starts at its bin/)."
    (tmp_path / "mysignals.py").write_text(
        "from cryptobot.strategy import crossed_above, ema\n"
        "def cross(close, fast, slow):\n"
        "    f, s = ema(close, fast), ema(close, slow)\n"
        "    return crossed_above(f, s), crossed_above(s, f)\n")
    (tmp_path / "mymod.py").write_text(          # imports its neighbour, as a user's package of two files would
        "from cryptobot.strategy import Strategy, Param, ewm_warmup\n"
        "from mysignals import cross\n"
        "class MyClass(Strategy):\n"
        "    params = {'fast': Param(int, 12, 2, 200), 'slow': Param(int, 26, 3, 400)}\n"
        "    @property\n"
        "    def warmup(self): return ewm_warmup(2 / (self.slow + 1)) + 1\n"
        "    def signals(self, candles, features=None):\n"
        "        return cross(candles['close'], self.fast, self.slow)\n")
    exe = Path(sys.executable).with_name("cryptobot")
    if not exe.exists():
        pytest.skip(f"console script absent: {exe}")
    p = subprocess.run([str(exe), "backtest", "--strategy", "mymod:MyClass", "--param", "fast=5", "--data", "synthetic",
                        "--n-synthetic", "2000", "--json", "out.json", "--html", "r.html"],
                       capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "CRYPTOBOT_STATE_DIR": str(tmp_path)})
    assert p.returncode == 0, p.stderr
    js = json.loads((tmp_path / "out.json").read_text())
    assert js["trades"] > 0 and "MyClass" in p.stdout


@pytest.mark.parametrize("period,lower,upper", [(14, 30, 70), (7, 25, 80), (21, 45, 55)])
def test_rsi_cross_rule_enters_only_where_rsi_crosses_back_above_lower_and_the_level_rule_is_unchanged(period, lower,
                                                                                                        upper):
    "cross=1: freqtrade's crossed_above(rsi, lower), prev <= lower < now; cross=0 (default): every close below lower."
    from cryptobot.data import synthetic_candles
    from cryptobot.strategy import check_strategy, rsi
    c = synthetic_candles(n=6000, seed=period)
    r = rsi(c["close"], period).to_numpy()
    prev = np.r_[np.nan, r[:-1]]
    with np.errstate(invalid="ignore"):
        want_cross, want_level, want_exit = (prev <= lower) & (r > lower), r < lower, r > upper
    level, cross = RsiReversion(period=period, lower=lower, upper=upper), RsiReversion(period=period, lower=lower,
                                                                                       upper=upper, cross=1)
    (le, lx), (ce, cx) = checked_signals(level, c), checked_signals(cross, c)
    assert (le == want_level).all() and (lx == want_exit).all() and (cx == lx).all()          # level rule unchanged
    assert (ce == want_cross).all() and 10 < ce.sum() < le.sum()
    assert not (ce & (r < lower)).any() and not (ce[1:] & ce[:-1]).any()                      # never below, never twice
    assert RsiReversion(period=period, lower=lower, upper=upper, cross="0").fingerprint() == level.fingerprint() \
        != cross.fingerprint()
    assert make_strategy("rsi_reversion", {"cross": "1", "period": str(period), "lower": str(lower),
                                           "upper": str(upper)}).fingerprint() == cross.fingerprint()
    for s in (level, cross):
        rep = check_strategy(s, c)
        assert rep.passed, rep.lines()
    with pytest.raises(StrategyError, match="cross=2 out of range"):
        RsiReversion(cross=2)
