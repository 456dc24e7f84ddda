"""Reports do not inline plotly.js (4.6 MB) in every page (issue 19): the reports folder holds one `plotly.min.js`,
written beside the pages once, and every page (backtest, sweep, a papermill workflow) loads it by a relative link, as
plotly's own include_plotlyjs="directory" does, so the folder still opens offline."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from plotly.offline import get_plotlyjs

BUNDLE = get_plotlyjs()
RELATIVE = '<script charset="utf-8" src="plotly.min.js"></script>'


def _offline_page(page: str) -> None:
    "Loads plotly.js from beside it, draws its figures, holds no copy of the bundle and no remote script."
    assert RELATIVE in page and "Plotly.newPlot" in page
    assert BUNDLE[:300] not in page and BUNDLE[-300:] not in page
    assert not re.search(r"<script[^>]*src=[\"']?(https?:)?//", page, re.I)


def test_two_cli_backtests_in_one_reports_folder_share_one_plotly_js(tmp_path):
    reports = tmp_path / "reports"
    env = {**os.environ, "CRYPTOBOT_STATE_DIR": str(tmp_path / "st"), "CRYPTOBOT_REPORTS_DIR": str(reports)}
    for strategy in ("ema_cross", "rsi_reversion"):
        p = subprocess.run([sys.executable, "-c", "import sys; from cryptobot.cli import main; sys.exit(main(sys.argv[1:]))",
                            "backtest", "--strategy", strategy, "--data", "synthetic", "--n-synthetic", "4000"],
                           capture_output=True, text=True, cwd=tmp_path, env=env)
        assert p.returncode == 0, p.stderr
        if strategy == "ema_cross":
            bundle = reports / "plotly.min.js"
            first = bundle.stat()
    pages = sorted(reports.glob("backtest-*.html"))
    assert [p.name.split("-")[1] for p in pages] == ["ema_cross", "rsi_reversion"]
    assert sorted(p.name for p in reports.iterdir()) == sorted([*(p.name for p in pages), "plotly.min.js"])
    assert bundle.read_text(encoding="utf-8") == BUNDLE
    assert (bundle.stat().st_ino, bundle.stat().st_mtime_ns) == (first.st_ino, first.st_mtime_ns)   # written once
    for p in pages:
        size = p.stat().st_size
        print(f"{p.name}: {size / 1e3:.0f} kB")
        assert size < 1_000_000, (p.name, size)
        _offline_page(p.read_text(encoding="utf-8"))


def test_a_sweep_report_beside_them_reuses_the_bundle(tmp_path):
    from cryptobot.backtest import backtest, report_html
    from cryptobot.data import synthetic_candles
    from cryptobot.strategy import EmaCross
    from cryptobot.sweep import parse_grid, report_sweep_html, run_sweep
    c = synthetic_candles(n=3_000, seed=4)
    reports = tmp_path / "reports"
    bt = report_html(backtest(c, EmaCross(fast=12, slow=26)), reports / "bt.html")
    ino = (reports / "plotly.min.js").stat().st_ino
    sw = run_sweep({"BTC": c}, "ema_cross", parse_grid(["fast=5,8", "slow=20,30"]), "s1", tmp_path / "sweeps",
                   scheduler="inprocess", progress=lambda m: None, n_folds=2)
    page = report_sweep_html(sw, reports / "sweep.html")
    assert (reports / "plotly.min.js").stat().st_ino == ino
    assert sorted(p.name for p in reports.iterdir()) == ["bt.html", "plotly.min.js", "sweep.html"]
    for p in (bt, page):
        assert p.stat().st_size < 1_000_000
        _offline_page(p.read_text(encoding="utf-8"))


def test_a_report_in_a_new_folder_brings_its_own_bundle(tmp_path):
    "The bundle goes where the page goes (the --html path's folder), so any report folder opens offline."
    from cryptobot.backtest import backtest, report_html
    from cryptobot.data import synthetic_candles
    from cryptobot.strategy import EmaCross
    res = backtest(synthetic_candles(n=1_500, seed=2), EmaCross())
    for d in ("a", "b/c"):
        page = report_html(res, tmp_path / d / "r.html")
        assert (page.parent / "plotly.min.js").read_text(encoding="utf-8") == BUNDLE
