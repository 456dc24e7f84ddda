"""`cryptobot bench`'s live part end to end: the runner in a real fresh process (`python -m cryptobot.bench --worker`),
the emulator on loopback, a real trained model. Speed is never asserted here (that is what the bench reports)."""
import json
import subprocess
import sys

from cryptobot import bench


def test_bench_live_runs_the_worker_module_in_its_own_process():
    out = bench.bench_live(n_candles=5)
    for k in bench.LIVE_KEYS + ("live_tick_ms_p90", "run_s"):
        assert isinstance(out[k], float) and out[k] > 0, k
    assert out["ticks"] == 5 and out["candles"] == 5
    assert out["targets"] == {k: bench.TARGETS[k] for k in ("live_tick_ms", "import_live_s", "live_rss_mb")}
    assert isinstance(out["ok"], bool)
    json.dumps(out)                                  # it goes into the bench's JSON


def test_worker_entry_point_refuses_other_arguments_in_one_line():
    p = subprocess.run([sys.executable, "-m", "cryptobot.bench", "--worker", "{}", "extra"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and p.stderr.startswith("usage: python -m cryptobot.bench")


def test_the_worker_is_exported_code_not_a_string():
    assert {"live_worker", "worker_main", "bench_live"} <= set(bench.__all__)
    assert not any(isinstance(v, str) and "L.run(" in v for v in vars(bench).values())


def test_bench_portfolio_runs_several_symbols_in_one_worker_process():
    out = bench.bench_portfolio(n_candles=3, n_symbols=3)
    assert out["symbols"] == 3 and out["portfolio_ticks"] >= 1 and out["portfolio_tick_ms"] > 0
    assert out["portfolio_rss_mb"] > 0 and set(out["targets"]) == set(bench.PORTFOLIO_KEYS)
    assert {k: bench.TARGETS[k] for k in bench.PORTFOLIO_KEYS} == {"portfolio_tick_ms": 50.0, "portfolio_rss_mb": 300.0}
    json.dumps(out)
