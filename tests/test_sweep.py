"Sweeps: the grid, the many-column kernel against single backtests (real 5-year file), walk-forward, PBO, DSR."

import numpy as np
import pandas as pd
import pytest

from cryptobot.backtest import backtest
from cryptobot.data import synthetic_candles
from cryptobot.strategy import EmaCross, RsiReversion, checked_signals
from cryptobot.sweep import SweepError, grid_signals, grid_trades, parse_grid, run_grid

from market import REAL_5Y as REAL, real_candles


@pytest.fixture(scope="module")
def real():
    return real_candles()


def _same(row, st):
    "A grid row equals a single backtest's stats: counts and final equity exactly, ratios to rounding."
    assert row.trades == st["trades"]
    for k in ("stop", "signal", "max_hold", "take_profit", "end"):
        assert row[f"exits_{k}"] == st[f"exits_{k}"], k
    assert row.exits_open == st["open_trades"]
    assert row.final_equity == st["final_equity"]
    assert row.max_drawdown == pytest.approx(st["max_drawdown"], rel=1e-12, abs=1e-15)
    assert row.sharpe == pytest.approx(st["sharpe"], rel=1e-9)


def test_ema_12_26_point_of_a_grid_reproduces_the_768_trades(real):
    cfg = parse_grid(["fast=5:50:1", "slow=20:60:2"])
    j = cfg.index({"fast": 12, "slow": 26})
    res = run_grid(real, "ema_cross", cfg, sizing="full", fee=0.001, slippage=0.0)
    single = backtest(real, EmaCross(fast=12, slow=26), sizing="full", fee=0.001, slippage=0.0)
    assert single.stats["trades"] == 768 and res.trades[j] == 768
    _same(res.iloc[j], single.stats)
    pd.testing.assert_frame_equal(grid_trades(real, "ema_cross", cfg, [j], sizing="full", fee=0.001, slippage=0.0)[0],
                                  single.trades)


@pytest.mark.parametrize("sizing,fee,slip", [("full", 0.001, 0.0), ("risk", 0.0004, 0.0002)])
def test_random_grid_points_equal_single_backtests(real, sizing, fee, slip):
    "12 random points per cost setting (24 in all), max_hold / take_profit varied per column too."
    cfg = parse_grid(["fast=2:80:3", "slow=10:300:7"])
    rng = np.random.default_rng(12)
    pick = sorted(rng.choice(len(cfg), 12, replace=False))
    sub = [dict(cfg[j], **({"max_hold": 24} if i % 3 == 1 else {}), **({"take_profit_pct": 3.0} if i % 3 == 2 else {}))
           for i, j in enumerate(pick)]
    res = run_grid(real, "ema_cross", sub, sizing=sizing, fee=fee, slippage=slip)
    EN, EX = grid_signals("ema_cross", real, sub)
    trades = grid_trades(real, "ema_cross", sub, list(range(len(sub))), sizing=sizing, fee=fee, slippage=slip)
    for j, p in enumerate(sub):
        single = backtest(real, EmaCross(**p), sizing=sizing, fee=fee, slippage=slip)
        en, ex = checked_signals(EmaCross(**p), real)
        assert (EN[j] == en).all() and (EX[j] == ex).all(), p
        _same(res.iloc[j], single.stats)
        pd.testing.assert_frame_equal(trades[j], single.trades)
    assert res.exits_max_hold.sum() > 0 and res.exits_take_profit.sum() > 0


def test_other_strategies_take_the_generic_signal_path():
    c = synthetic_candles(n=4000, seed=5)
    cfg = parse_grid(["period=7,14", "lower=25,30", "upper=70"], "rsi_reversion")
    res = run_grid(c, "rsi_reversion", cfg, sizing="full", fee=0.001, slippage=0.0)
    for j, p in enumerate(cfg):
        _same(res.iloc[j], backtest(c, RsiReversion(**p), sizing="full", fee=0.001, slippage=0.0).stats)


def test_windows_are_backtests_of_the_slice_with_history_signals():
    c = synthetic_candles(n=3000, seed=9)
    cfg = parse_grid(["fast=5,10", "slow=30"])
    res = run_grid(c, "ema_cross", cfg, sizing="full", fee=0.001, slippage=0.0, windows=[(1000, 2000)], end="exit")
    from cryptobot.backtest import simulate_signals
    EN, EX = grid_signals("ema_cross", c, cfg)
    for j in range(2):
        tr = simulate_signals(c.iloc[1000:2000], EN[j, 1000:2000], EX[j, 1000:2000], sizing="full", fee=0.001,
                              slippage=0.0, end="exit")
        assert res.trades[j] == len(tr) and res.final_equity[j] == pytest.approx(tr.attrs["final_equity"], rel=1e-12)


@pytest.mark.parametrize("specs,key", [(["fast=1:5:1"], "fast"), (["fast=12.5"], "fast"), (["speed=3"], "speed"),
                                       (["slow=20:10:5"], "slow"), (["slow=a,b"], "slow"), (["fast=5", "fast=6"], "fast"),
                                       (["slow=20:200:0"], "slow"), (["slow=500"], "slow")])
def test_bad_grid_specs_are_refused_in_one_line_naming_the_key(specs, key):
    with pytest.raises(SweepError) as e:
        parse_grid(specs)
    assert key in str(e.value) and "\n" not in str(e.value)


def test_walk_forward_on_the_real_file_chains_single_backtests_of_each_choice(real):
    from cryptobot.backtest import simulate_signals
    from cryptobot.sweep import OBJECTIVES, walk_forward
    cfg = parse_grid(["fast=4:60:2", "slow=20:300:10"])
    assert len(cfg) >= 500
    wf = walk_forward(real, "ema_cross", cfg, "calmar", n_folds=4, anchored=True, sizing="full", fee=0.001, slippage=0.0)
    cash = 10_000.0
    for f in wf["folds"].itertuples():
        ins = wf["grid"][(wf["grid"].fold == f.fold) & (wf["grid"]["sample"] == "is")]
        assert ins.calmar.max() == ins.calmar.iloc[f.config]                # chosen by the objective in training
        lo, hi = real.index.get_loc(f.test_start), real.index.get_loc(f.test_end) + 1
        en, ex = checked_signals(EmaCross(**cfg[f.config]), real)
        tr = simulate_signals(real.iloc[lo:hi], en[lo:hi], ex[lo:hi], sizing="full", fee=0.001, slippage=0.0,
                              initial_cash=cash, end="exit")
        assert wf["equity"].loc[f.test_end] == pytest.approx(tr.attrs["final_equity"], rel=1e-9)
        cash = tr.attrs["final_equity"]
    assert wf["oos_return"] == pytest.approx(cash / 10_000 - 1, rel=1e-9)
    assert wf["equity"].index.equals(wf["benchmark"].index) and wf["equity"].index[-1] == real.index[-1]
    assert 0 <= wf["pbo"]["pbo"] <= 1 and wf["pbo"]["splits"] == 12870 and 0 <= wf["dsr"]["dsr"] <= 1
    assert set(OBJECTIVES) == {"sharpe", "return", "calmar"}


def test_pbo_knows_noise_from_skill():
    from cryptobot.sweep import block_stats, pbo_cscv
    rng = np.random.default_rng(1)
    noise = [pbo_cscv(block_stats(rng.normal(0, 0.01, (1500, 40)), 12))["pbo"] for _ in range(4)]
    assert abs(np.mean(noise) - 0.5) < 0.1                               # the in-sample winner is a coin flip
    skill = rng.normal(0, 0.01, (1500, 40))
    skill[:, 3] += 0.008
    assert pbo_cscv(block_stats(skill, 12))["pbo"] == 0.0


def test_deflated_sharpe_by_hand():
    import math
    from scipy.stats import norm
    from cryptobot.sweep import deflated_sharpe
    sr, T, N, V, sk, ku = 0.05, 5000, 250, 0.0004, -0.3, 6.0
    g = 0.5772156649015329
    sr0 = math.sqrt(V) * ((1 - g) * norm.ppf(1 - 1 / N) + g * norm.ppf(1 - 1 / (N * math.e)))
    want = norm.cdf((sr - sr0) * math.sqrt(T - 1) / math.sqrt(1 - sk * sr + (ku - 1) / 4 * sr ** 2))
    assert deflated_sharpe(sr, T, N, V, sk, ku) == pytest.approx(want, rel=1e-12) and 0 < want < 1


def test_walk_forward_refuses_an_unknown_objective():
    from cryptobot.sweep import walk_forward
    with pytest.raises(SweepError, match="objective"):
        walk_forward(synthetic_candles(n=2000), "ema_cross", parse_grid(["fast=5", "slow=20"]), "profit")


SWEEP_KW = dict(n_folds=3, block_size=8, blocks=8, sizing="full", fee=0.001, slippage=0.0)


def _figures(sw):
    "Everything a sweep reports, as JSON text (NaN spelt out, so equal results compare equal)."
    import json
    r = sw["symbols"]
    return json.dumps({s: (w["folds"].to_dict("list"), w["grid"].to_dict("list"), w["whole"].to_dict("list"), w["oos_return"],
                w["pbo"]["pbo"], list(w["pbo"]["logits"]), w["dsr"], list(w["equity"])) for s, w in r.items()},
                      default=str, sort_keys=True)


def _run_in_subprocess(root, sweep_id, data_path, grid):
    import subprocess
    import sys
    code = ("import sys; from cryptobot.data import load_candles; from cryptobot.sweep import parse_grid, run_sweep; "
            f"run_sweep({{'BTC': load_candles({str(data_path)!r})}}, 'ema_cross', parse_grid({grid!r}), {sweep_id!r}, "
            f"{str(root)!r}, scheduler='inprocess', **{SWEEP_KW!r})")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)


def test_a_killed_sweep_resumes_and_computes_only_what_is_missing(real, tmp_path):
    import os
    import signal
    import time
    from cryptobot.sweep import run_sweep
    grid = ["fast=4:60:2", "slow=20:300:10"]
    cfg = parse_grid(grid)
    total = len(range(0, len(cfg), 8)) * 5              # whole span + 3 folds + the latest training window
    p = _run_in_subprocess(tmp_path, "killed", REAL, grid)
    store = tmp_path / "killed" / "BTC"
    t0 = time.monotonic()
    while len(list(store.glob("*.parquet"))) < 20 and p.poll() is None and time.monotonic() - t0 < 120:
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    before = len(list(store.glob("*.parquet")))
    assert 20 <= before < total, (before, total, p.stderr.read())
    resumed = run_sweep({"BTC": real}, "ema_cross", cfg, "killed", tmp_path, scheduler="inprocess",
                        progress=lambda m: None, **SWEEP_KW)
    assert (resumed["tasks"], resumed["reused"], resumed["computed"]) == (total, before, total - before)
    fresh = run_sweep({"BTC": real}, "ema_cross", cfg, "fresh", tmp_path, scheduler="inprocess", progress=lambda m: None,
                      **SWEEP_KW)
    assert fresh["computed"] == total and _figures(resumed) == _figures(fresh)


def test_same_sweep_in_process_on_a_local_cluster_and_on_separate_dask_processes(tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import sys
    from cryptobot.sweep import run_sweep
    c = {"SYN-A (synthetic)": synthetic_candles(n=4000, seed=21), "SYN-B (synthetic)": synthetic_candles(n=4000, seed=22)}
    cfg = parse_grid(["fast=4:20:4", "slow=25:65:10"])
    run = lambda i, sch: run_sweep(c, "ema_cross", cfg, i, tmp_path, scheduler=sch, progress=lambda m: None,  # noqa: E731
                                   **SWEEP_KW)
    ref = _figures(run("inproc", "inprocess"))
    assert _figures(run("local", "local")) == ref
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dask = [os.path.join(os.path.dirname(sys.executable), "dask")]
    procs = [subprocess.Popen(dask + ["scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)]
    try:
        procs.append(subprocess.Popen(dask + ["worker", f"tcp://127.0.0.1:{port}", "--nworkers", "2", "--nthreads", "1",
                                              "--no-dashboard"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True))
        from distributed import Client
        with Client(f"tcp://127.0.0.1:{port}", timeout=30) as cl:
            cl.wait_for_workers(2, timeout=60)
        sw = run("remote", f"tcp://127.0.0.1:{port}")
        assert sw["computed"] == sw["tasks"] and _figures(sw) == ref
    finally:
        for p in procs[::-1]:
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs[::-1]:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _cli(args, cwd):
    import os
    import subprocess
    import sys
    code = "import sys; from cryptobot.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "CRYPTOBOT_STATE_DIR": str(cwd)})


def test_cli_sweep_of_500_plus_configurations_on_the_real_file_writes_report_and_json_and_resumes(real, tmp_path):
    import json
    args = ["sweep", "--strategy", "ema_cross", "--grid", "fast=4:60:2", "--grid", "slow=20:300:10", "--data", str(REAL),
            "--objective", "sharpe", "--id", "real", "--sizing", "full", "--fee", "0.1", "--slippage", "0",
            "--scheduler", "inprocess", "--json", "out.json"]
    p = _cli(args, tmp_path)
    assert p.returncode == 0, p.stderr
    assert "sweep real: 91 tasks" in p.stderr and "91/91 tasks computed" in p.stderr     # progress on stderr
    js = json.loads((tmp_path / "out.json").read_text())
    assert js["configs"] == 786 and js["computed"] == 91
    x = js["symbols"][REAL.stem]
    assert len(x["folds"]) == 5 and len(x["top"]) == 10 and 0 <= x["pbo"] <= 1 and 0 <= x["dsr"]["dsr"] <= 1
    assert x["buy_and_hold_return"] > 0 and {"oos_return", "oos_max_drawdown", "degradation"} <= set(x)   # to the holdout
    assert x["next"][0]["config"] == js["symbols"][REAL.stem]["next"][0]["config"] and len(x["next"]) == 10
    page = (tmp_path / "reports" / "sweep-real.html").read_text()
    assert page.count("Plotly.newPlot") == 2 and '"type": "heatmap"' in page and "<script src=" not in page
    assert "probability of backtest overfitting" in page and "deflated Sharpe ratio" in page
    assert sorted(p.name for p in (tmp_path / "data" / "sweeps" / "real").iterdir()) == [REAL.stem, "candles", "result.json",
                                                                                        "sweep.json"]
    again = _cli(args, tmp_path)
    assert again.returncode == 0 and "91 already stored, 0 to compute" in again.stderr
    js2 = json.loads((tmp_path / "out.json").read_text())
    assert js2["reused"] == 91 and js2["symbols"] == js["symbols"]


@pytest.mark.parametrize("grid,says", [(["--grid", "fast=1:9:1"], "--grid fast"), (["--grid", "speed=3"], "--grid speed"),
                                       ([], "no --grid")])
def test_cli_sweep_refuses_a_bad_grid_in_one_line(tmp_path, grid, says):
    p = _cli(["sweep", "--data", "synthetic", "--n-synthetic", "2000", *grid], tmp_path)
    assert p.returncode == 1 and says in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "data" / "sweeps").exists()


def test_cli_promote_writes_the_chosen_configuration_with_its_evidence(tmp_path):
    import json
    p = _cli(["sweep", "--data", "synthetic", "--n-synthetic", "3000", "--grid", "fast=5:15:5", "--grid", "slow=30,60",
              "--folds", "2", "--id", "s1", "--scheduler", "inprocess", "--json", "s.json"], tmp_path)
    assert p.returncode == 0, p.stderr
    top = next(iter(json.loads((tmp_path / "s.json").read_text())["symbols"].values()))["next"]   # the latest window's ranking
    q = _cli(["promote", "s1", "--rank", "2"], tmp_path)
    assert q.returncode == 0, q.stderr
    [art] = list((tmp_path / "data" / "strategies").glob("*/strategy.json"))
    m = json.loads(art.read_text())
    assert (m["params"]["fast"], m["params"]["slow"]) == (top[1]["fast"], top[1]["slow"])
    assert m["strategy_fingerprint"] == EmaCross(fast=top[1]["fast"], slow=top[1]["slow"]).fingerprint()
    assert art == tmp_path / "data" / "strategies" / "ema_cross" / "strategy.json"        # where the runner looks
    ev = m["evidence"]
    assert ev["sweep_id"] == "s1" and ev["rank"] == 2 and ev["configs_tried"] == 6 and 0 <= ev["pbo"] <= 1
    from cryptobot.data import synthetic_candles
    from cryptobot.sweep import _fingerprint_candles
    assert list(ev["data"].values()) == [_fingerprint_candles(synthetic_candles(n=3000))]   # --n-synthetic honoured
    assert list(ev["sources"].values()) == ["synthetic"]
    assert any("synthetic market" in w for w in m["evidence_failures"])                    # never a go-live pass
    bad = [w for w in ("overfitting", "not positive") if w in " ".join(m["evidence_failures"])]
    assert bad == [w for w, fails in (("overfitting", ev["pbo"] > 0.5), ("not positive", ev["walk_forward_oos_return"] <= 0))
                   if fails]
    assert ("WARNING" in q.stderr) == bool(m["evidence_failures"])
    r = _cli(["promote", "nope"], tmp_path)
    assert r.returncode == 1 and "result.json missing" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_the_live_path_and_the_cli_import_no_dask_and_no_sweep():
    import subprocess
    import sys
    code = ("import sys, cryptobot.live, cryptobot.cli; print(','.join(m for m in ('dask', 'distributed', 'scipy', "
            "'cryptobot.sweep') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing cryptobot.live / cryptobot.cli pulled in {out}"


SETTINGS_KW = dict(objective="sharpe", n_folds=3, fee=0.001, sizing="full", holdout=0.2)


@pytest.mark.parametrize("key,other", [("objective", "calmar"), ("n_folds", 2), ("fee", 0.002), ("sizing", "risk"),
                                       ("holdout", 0.1), ("slippage", 0.001)])
def test_a_sweep_resumed_with_other_settings_is_refused_in_one_line_naming_them(tmp_path, key, other):
    from cryptobot.sweep import run_sweep
    c = synthetic_candles(n=3000, seed=4)
    cfg = parse_grid(["fast=5,10", "slow=30,60"])
    kw = dict(SETTINGS_KW, slippage=0.0, block_size=8, blocks=4, scheduler="inprocess", progress=lambda m: None)
    run_sweep({"S": c}, "ema_cross", cfg, "one", tmp_path, **kw)
    stored = sorted(p.stat().st_mtime_ns for p in (tmp_path / "one").rglob("*.parquet"))
    with pytest.raises(SweepError) as e:
        run_sweep({"S": c}, "ema_cross", cfg, "one", tmp_path, **{**kw, key: other})
    msg = str(e.value)
    assert "\n" not in msg and key in msg and "new --id" in msg, msg
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "one").rglob("*.parquet")) == stored   # nothing mixed in


def test_the_holdout_is_out_of_every_sweep_decision(tmp_path):
    "Two candle sets equal up to the holdout: the same sweep (folds, PBO, DSR, next pick); only promote's holdout differs."
    from cryptobot.sweep import promote, run_sweep
    a = synthetic_candles(n=4000, seed=8)
    b = a.copy()
    b.iloc[3200:, :4] = a.iloc[3200:, :4].to_numpy()[::-1] * 0.9 + 1.0      # another market after bar 3200
    b["high"], b["low"] = b[["open", "high", "low", "close"]].max(axis=1), b[["open", "high", "low", "close"]].min(axis=1)
    cfg = parse_grid(["fast=5:25:5", "slow=40:120:40"])
    kw = dict(n_folds=3, block_size=64, blocks=8, sizing="full", fee=0.001, slippage=0.0, scheduler="inprocess",
              progress=lambda m: None)
    sa, sb = (run_sweep({"S": x}, "ema_cross", cfg, i, tmp_path / "sw", **kw) for x, i in ((a, "a"), (b, "b")))
    assert _figures(sa) == _figures(sb)
    pd.testing.assert_frame_equal(sa["symbols"]["S"]["next"], sb["symbols"]["S"]["next"])
    assert sa["symbols"]["S"]["equity"].index[-1] == a.index[3199]             # the walk-forward stops before the holdout
    ma, mb = (promote(tmp_path / "sw" / i, data_dir=tmp_path / i) for i in ("a", "b"))
    assert ma["params"] == mb["params"]
    ha, hb = ma["evidence"]["holdout"]["S"], mb["evidence"]["holdout"]["S"]
    assert ha["start"] == hb["start"] == str(a.index[3200]) and ha["bars"] == 800 and ha["return"] != hb["return"]
    assert ma["evidence"]["holdout_return"] == ha["return"] and ma["evidence"]["holdout_share"] == 0.2


def test_promote_takes_the_procedures_next_pick_and_shows_its_own_out_of_sample_figures(tmp_path):
    "Not the whole-span best: what the walk-forward procedure would choose on its latest training window."
    from cryptobot.sweep import make_folds, next_train, promote, run_sweep
    c = synthetic_candles(n=5000, seed=3)
    cfg = parse_grid(["fast=5:30:5", "slow=40:200:40"])
    sw = run_sweep({"S": c}, "ema_cross", cfg, "p", tmp_path / "sw", n_folds=4, sizing="full", fee=0.001, slippage=0.0,
                   scheduler="inprocess", progress=lambda m: None)
    w = sw["symbols"]["S"]
    ins = c.iloc[:4000]
    lo, hi = next_train(len(ins), 4)
    assert (lo, hi) == (make_folds(len(ins), 4)[-1]["test"])                 # rolling, 1 segment: the last test window
    m = promote(tmp_path / "sw" / "p", data_dir=tmp_path)
    j = m["evidence"]["configuration"]["config"]
    assert m["params"]["fast"] == cfg[j]["fast"] and m["params"]["slow"] == cfg[j]["slow"]
    assert j == int(w["next"]["config"].iloc[0]) and j == int(w["grid"].query("fold == 3 and sample == 'oos'")
                                                             .set_index("config").sharpe.idxmax())
    whole_best = int(w["whole"].sharpe.idxmax())
    assert j != whole_best, "choose a seed where the two differ, or the test shows nothing"
    own = np.prod([1 + r for r in w["grid"].query("sample == 'oos' and config == @j").sort_values("fold").total_return]) - 1
    assert m["evidence"]["own_oos_return"]["S"] == pytest.approx(own, rel=1e-12)
    assert m["evidence"]["walk_forward_oos_return"] == w["oos_return"] != pytest.approx(own)
    # a second configuration scored on the same holdout spends it: the bar fails whatever the figures
    m2 = promote(tmp_path / "sw" / "p", rank=2, data_dir=tmp_path / "other")
    assert m2["evidence"]["holdout_configs_scored"] == 2 and any("holdout has scored 2" in f for f in m2["evidence_failures"])
    m3 = promote(tmp_path / "sw" / "p", rank=1, data_dir=tmp_path / "third")            # the first again: the same score
    assert m3["evidence"]["holdout"] == m["evidence"]["holdout"] and m3["evidence"]["holdout_configs_scored"] == 2


def test_a_strategy_that_uses_features_is_swept_with_its_features_built(tmp_path, monkeypatch):
    from cryptobot.features import build_features
    from cryptobot.sweep import promote, run_sweep, walk_forward
    (tmp_path / "featstrat.py").write_text(
        "from cryptobot.strategy import Param, Strategy\n"
        "class RsiFeature(Strategy):\n"
        "    uses_features = True\n"
        "    params = {'lower': Param(float, 30.0, 1.0, 50.0), 'upper': Param(float, 70.0, 50.0, 99.0)}\n"
        "    def signals(self, candles, features=None):\n"
        "        r = features['rsi_14'].reindex(candles.index)\n"
        "        return (r < self.lower).fillna(False), (r > self.upper).fillna(False)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    c = synthetic_candles(n=3000, seed=6)
    cfg = parse_grid(["lower=25,30", "upper=70,75"], "featstrat:RsiFeature")
    res = run_grid(c, "featstrat:RsiFeature", cfg, sizing="full", fee=0.001, slippage=0.0)
    f = build_features(c)
    for j, p in enumerate(cfg):
        from featstrat import RsiFeature
        _same(res.iloc[j], backtest(c, RsiFeature(**p), features=f, sizing="full", fee=0.001, slippage=0.0).stats)
    assert res.trades.sum() > 0
    wf = walk_forward(c, "featstrat:RsiFeature", cfg, n_folds=2, sizing="full", fee=0.001, slippage=0.0, blocks=4)
    assert len(wf["folds"]) == 2 and "next" in wf
    run_sweep({"S": c}, "featstrat:RsiFeature", cfg, "f", tmp_path / "sw", n_folds=2, blocks=4, scheduler="inprocess",
              progress=lambda m: None)
    assert promote(tmp_path / "sw" / "f", data_dir=tmp_path)["evidence"]["holdout"]["S"]["bars"] == 600


def test_sweep_and_promote_print_figures_rounded_for_a_person(tmp_path):
    import re
    p = _cli(["sweep", "--data", "synthetic", "--n-synthetic", "3000", "--grid", "fast=5:15:5", "--grid", "slow=30,60",
              "--folds", "2", "--id", "r", "--scheduler", "inprocess"], tmp_path)
    q = _cli(["promote", "r"], tmp_path)
    assert p.returncode == 0 and q.returncode == 0, p.stderr + q.stderr
    out = p.stdout + q.stdout + q.stderr
    assert "PBO" in q.stdout and "DSR" in q.stdout and "holdout" in q.stdout
    assert not re.search(r"\d\.\d{4,}", out), out                           # no 0.27513597513597515


@pytest.mark.parametrize("entry", ["run_grid", "grid_trades", "walk_forward", "run_sweep"])
@pytest.mark.parametrize("kw", [{"fee": 0.1}, {"slippage": 0.075}])
def test_grid_refuses_a_fee_or_slippage_given_in_percent(entry, kw, tmp_path):
    "run_grid and everything built on it take fractions; a percent (above 0.05) is refused before any work or file."
    from cryptobot.risk import CostError
    from cryptobot.sweep import run_sweep, walk_forward
    c = synthetic_candles(n=1500, seed=2)
    grid = parse_grid(["fast=5", "slow=20"])
    calls = {"run_grid": lambda **k: run_grid(c, "ema_cross", grid, **k),
             "grid_trades": lambda **k: grid_trades(c, "ema_cross", grid, [0], **k),
             "walk_forward": lambda **k: walk_forward(c, "ema_cross", grid, **k),
             "run_sweep": lambda **k: run_sweep({"SYN": c}, "ema_cross", grid, "s1", tmp_path, scheduler="inprocess", **k)}
    (k, v), = kw.items()
    with pytest.raises(CostError, match=rf"^{k}={v} is a fraction \({v * 100:g} %\): did you mean {k}={v / 100:g}\? .*"
                                        rf"the CLI's --{k} takes percent$"):
        calls[entry](**kw)
    assert not any(tmp_path.iterdir())


def test_the_grids_emas_equal_the_strategys_ema_to_the_bit(real):
    "The sweep's numba EMAs (all spans on all cores) are `strategy.ema`'s, bit for bit, on the real file and a random one."
    from cryptobot.strategy import ema
    from cryptobot.sweep import _ema_rows
    for c in (real, synthetic_candles(n=5_000, seed=7)):
        spans = np.arange(2, 401)
        E = np.empty((len(spans), len(c)))
        _ema_rows(np.ascontiguousarray(c["close"].to_numpy("float64")), spans, E)
        bad = [int(s) for k, s in enumerate(spans) if not np.array_equal(E[k], ema(c["close"], int(s)).to_numpy())]
        assert bad == [], bad


def _summary_by_the_book(eq: np.ndarray, per_year: float) -> tuple[float, float]:
    "(max drawdown, Sharpe) as the sweep computed them before it ran on all cores: plain sequential loops."
    import math
    peak, dd = eq[0], 0.0
    for x in eq:
        peak = max(peak, x)
        dd = min(dd, x / peak - 1.0)
    r = eq[1:] / eq[:-1] - 1.0
    mean = 0.0
    for v in r:
        mean += v
    mean /= max(len(eq) - 1, 1)
    ss = 0.0
    for v in r:
        ss += (v - mean) * (v - mean)
    sd = math.sqrt(ss / (len(eq) - 2))
    return dd, (mean / sd * math.sqrt(per_year) if sd > 0 else float("nan"))


def test_the_grid_on_all_cores_is_the_grid_on_one_and_its_figures_are_the_kernels_to_the_bit(real):
    "Columns run in parallel and skip the divisions of bars whose equity did not move: the figures are still exact."
    import numba
    from cryptobot.backtest import simulate_full
    cfg = parse_grid(["fast=3:60:9", "slow=20:200:30"])
    kw = dict(sizing="risk", fee=0.001, slippage=0.0005)
    res = run_grid(real, "ema_cross", cfg, **kw)
    n0 = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = run_grid(real, "ema_cross", cfg, **kw)
    finally:
        numba.set_num_threads(n0)
    pd.testing.assert_frame_equal(res, one, check_exact=True)
    per_year = pd.Timedelta(days=365) / (real.index[1] - real.index[0])
    EN, EX = grid_signals("ema_cross", real, cfg)
    for j in (0, len(cfg) // 2, len(cfg) - 1):
        _, eq, _ = simulate_full(real, EN[j], EX[j], None, None, 0.001, 0.0005, 10_000.0, "risk")
        dd, sharpe = _summary_by_the_book(eq, per_year)
        assert (res.max_drawdown[j], res.sharpe[j], res.final_equity[j]) == (dd, sharpe, eq[-1]), cfg[j]
