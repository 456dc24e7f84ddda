"""Numba's on-disk cache must never run yesterday's fill rules.

Numba checks only a cached function's own file: `backtest.fill_kernel` inlines `risk.floor_units`, and
`sweep._sweep_cols` inlines `fill_kernel`. Without `backtest.numba_cache_dir`, editing `risk.py` alone leaves the kernel
(and the sweep) running the old floor from the cache. Here a copy of the package is run twice in fresh processes,
the second time after `floor_units` in `risk.py` has been changed to floor every amount to zero: the backtest and
the sweep must both see the change (no trades), which they do not when the cache is keyed on each file alone."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cryptobot

SCRIPT = """
import json, sys, cryptobot
from cryptobot.data import synthetic_candles
from cryptobot.backtest import backtest
from cryptobot.strategy import EmaCross
from cryptobot.sweep import run_grid
assert cryptobot.__file__.startswith(sys.argv[1]), cryptobot.__file__
c = synthetic_candles(n=3000)
one = backtest(c, EmaCross(fast=5, slow=20), sizing="full", fee=0.001, slippage=0.0)
grid = run_grid(c, "ema_cross", [{"fast": 5, "slow": 20}], sizing="full", fee=0.001, slippage=0.0)
print(json.dumps({"backtest": len(one.trades), "sweep": int(grid["trades"].iloc[0])}))
"""


def _run(pkg_root: Path, cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(PYTHONPATH=str(pkg_root), XDG_CACHE_HOME=str(cache))
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(pkg_root)], env=env, capture_output=True, text=True,
                         timeout=600, cwd=pkg_root)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_an_edit_to_an_inlined_module_is_never_served_from_the_stale_cache(tmp_path):
    root = tmp_path / "pkg"
    shutil.copytree(Path(cryptobot.__file__).parent, root / "cryptobot",
                    ignore=shutil.ignore_patterns("__pycache__"))
    cache = tmp_path / "cache"
    before = _run(root, cache)
    assert before["backtest"] > 0 and before["sweep"] == before["backtest"], before
    risk = root / "cryptobot" / "risk.py"
    src = risk.read_text()
    edited = re.sub(r'(def floor_units\(x, m, k\):\n    """.*?"""\n)', r"\1    return 0.0\n", src, count=1, flags=re.S)
    assert edited != src, "floor_units not found in risk.py: update this test"
    risk.write_text(edited)
    after = _run(root, cache)
    assert after == {"backtest": 0, "sweep": 0}, f"stale numba cache: {before} -> {after}"
