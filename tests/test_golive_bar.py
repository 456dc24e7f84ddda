"""The go-live bar (`strategy.evidence_failures`, used by `promote` and the audit), measured: a user's grid swept and
promoted on pure-noise candles must (almost) never pass, and on candles with a planted edge that a grid point can
exploit after costs it must (almost) always pass.

Noise: zero-drift random walks, hourly volatility 0.6 % (about BTC's), 4,000 hourly bars. Planted edge: the same
noise plus a drift of +-0.2 % a bar that alternates between up and down regimes of 75..225 bars (the market goes
nowhere on average; an EMA cross that is long in the up legs and flat in the down legs earns after costs).
Grid: EMA cross fast 5..25 x slow 40..160 (20 configurations), 4 folds, the default costs (0.1 % fee, 0.05 %
slippage) and risk sizing, the default 20 % holdout. Always on: 40 noise sets and 16 planted-edge sets through
the Python API (`run_sweep` + `promote`, what the CLI calls; about 1 s a set), one of each through the CLI itself.
CRYPTOBOT_GOLIVE_SEEDS=N runs N of each (the notebook's table: N=40 and N=200)."""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from cryptobot.strategy import evidence_failures
from cryptobot.sweep import parse_grid, promote, run_sweep

SEEDS = {k: int(os.environ.get("CRYPTOBOT_GOLIVE_SEEDS", n)) for k, n in (("noise", 40), ("edge", 16))}
GRID = ["fast=5:25:5", "slow=40:160:40"]
N, VOL, EDGE, REGIME = 4000, 0.006, 0.002, 150


def candles(seed: int, edge: float = 0.0) -> pd.DataFrame:
    "Hourly candles: a zero-drift random walk, plus (edge > 0) alternating up/down drift regimes."
    rng = np.random.default_rng(seed)
    mu = np.zeros(N)
    if edge:
        lens = rng.integers(REGIME // 2, 3 * REGIME // 2, N // (REGIME // 2) + 2)
        mu = edge * np.repeat(np.resize([1.0, -1.0], len(lens)), lens)[:N] * rng.choice([1.0, -1.0])
    close = 20_000 * np.exp(np.cumsum(mu + VOL * rng.standard_normal(N)))
    op = np.r_[20_000.0, close[:-1]]
    hi = np.maximum(op, close) * np.exp(VOL * 0.5 * rng.exponential(1, N))
    lo = np.minimum(op, close) * np.exp(-VOL * 0.5 * rng.exponential(1, N))
    idx = pd.date_range("2023-01-01", periods=N, freq="1h", tz="UTC", name="timestamp")
    return pd.DataFrame({"open": op, "high": hi, "low": lo, "close": close, "volume": 1.0}, index=idx).round(2)


def _passes(tmp, kind: str, seed: int) -> tuple[bool, dict]:
    "Sweep and promote one candle set through the Python API; (passes the bar, the evidence)."
    c = candles(seed, EDGE if kind == "edge" else 0.0)
    c.attrs["source"] = f"real:{kind}-{seed}.csv"                  # labelled as a user's file would be
    sid = f"{kind}-{seed}"
    run_sweep({"X": c}, "ema_cross", parse_grid(GRID), sid, tmp / "sweeps", n_folds=4, scheduler="inprocess",
              progress=lambda m: None)
    m = promote(tmp / "sweeps" / sid, data_dir=tmp / sid)
    assert m["evidence_failures"] == evidence_failures(m["evidence"])
    return not m["evidence_failures"], m["evidence"]


def test_the_go_live_bar_fails_noise_and_passes_a_planted_edge(tmp_path):
    res = {k: [_passes(tmp_path, k, s) for s in range(n)] for k, n in SEEDS.items()}
    rate = {k: float(np.mean([p for p, _ in v])) for k, v in res.items()}
    gate = lambda k, f: float(np.mean([f(e) for _, e in res[k]]))  # noqa: E731
    for k in res:       # each gate alone, for the notebook's table
        print(f"{k} ({len(res[k])} sets): bar {rate[k]:.3f} | DSR>=0.95 {gate(k, lambda e: min(e['deflated_sharpe'].values()) >= 0.95):.3f}"
              f" | PBO<=0.5 {gate(k, lambda e: e['pbo'] is not None and e['pbo'] <= 0.5):.3f}"
              f" | walk-forward>0 {gate(k, lambda e: e['walk_forward_oos_return'] > 0):.3f}"
              f" | holdout>0 {gate(k, lambda e: (e['holdout_return'] or 0) > 0):.3f}"
              f" | old bar (PBO and walk-forward) {gate(k, lambda e: e['pbo'] is not None and e['pbo'] <= 0.5 and e['walk_forward_oos_return'] > 0):.3f}")
    assert rate["noise"] <= 0.05, rate
    assert rate["edge"] >= 0.90, rate


def _cli(args, cwd):
    code = "import sys; from cryptobot.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CRYPTOBOT_", "BINANCE_", "GO_LIVE"))}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd,
                          env={**env, "CRYPTOBOT_STATE_DIR": str(cwd / "var")}, timeout=300)


@pytest.mark.parametrize("kind,seed", [("noise", 101), ("edge", 101)])
def test_the_cli_sweep_and_promote_judge_noise_and_edge_alike(tmp_path, kind, seed):
    "The same bar through `cryptobot sweep` + `cryptobot promote` on a user's candle file."
    f = tmp_path / f"{kind}.csv"
    candles(seed, EDGE if kind == "edge" else 0.0).tz_convert(None).to_csv(f)
    p = _cli(["sweep", "--strategy", "ema_cross", *sum((["--grid", g] for g in GRID), []), "--data", str(f),
              "--folds", "4", "--id", "s", "--scheduler", "inprocess", "--fee", "0.1", "--slippage", "0.05"], tmp_path)
    assert p.returncode == 0, p.stderr
    q = _cli(["promote", "s"], tmp_path)
    assert q.returncode == 0, q.stderr
    m = json.loads((tmp_path / "data" / "strategies" / "ema_cross" / "strategy.json").read_text())
    assert ("WARNING" in q.stderr) == bool(m["evidence_failures"])
    assert bool(m["evidence_failures"]) == (kind == "noise"), (m["evidence_failures"], m["evidence"])
    ev = m["evidence"]
    assert ev["holdout"]["edge" if kind == "edge" else "noise"]["bars"] == 800 and "holdout (last 20%" in q.stdout
    if kind == "noise":                   # the gate the measurement shows separates noise from edge
        assert any(f.startswith("deflated Sharpe ratio") for f in m["evidence_failures"]), m["evidence_failures"]
