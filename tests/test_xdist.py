"""`make test` runs pytest on two workers (pytest-xdist); a test marked `exclusive` (a timed assertion) must still run
alone. A scratch suite with this conftest, run with `-n 2`, records when each test starts and ends: no exclusive
test may overlap any other test, and the plain tests must really run side by side (or the check proves nothing)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("xdist")
HERE = Path(__file__).resolve().parent

SUITE = '''
import os, time, pytest
LOG = os.environ["XDIST_PROBE_LOG"]

def record(name):
    with open(LOG, "a") as f:
        f.write(f"{time.time():.6f} start {name}\\n")
    time.sleep(0.4)
    with open(LOG, "a") as f:
        f.write(f"{time.time():.6f} end {name}\\n")

@pytest.mark.exclusive
@pytest.mark.parametrize("i", range(3))
def test_a_timed(i):
    record(f"excl{i}")

@pytest.mark.parametrize("i", range(8))
def test_b_plain(i):
    record(f"plain{i}")

@pytest.mark.exclusive
def test_c_timed_last():
    record("excl_last")
'''


def intervals(log: Path) -> dict[str, tuple[float, float]]:
    ev = {}
    for line in log.read_text().splitlines():
        t, kind, name = line.split()
        ev.setdefault(name, {})[kind] = float(t)
    return {n: (e["start"], e["end"]) for n, e in ev.items()}


def test_an_exclusive_test_never_overlaps_another_under_two_workers(tmp_path):
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_probe.py").write_text(SUITE)
    log = tmp_path / "log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}     # this run may be a worker itself
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "no:cacheprovider", str(tmp_path)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**env, "XDIST_PROBE_LOG": str(log)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    spans = intervals(log)
    assert len(spans) == 12, spans
    overlap = lambda a, b: a[0] < b[1] and b[0] < a[1]  # noqa: E731
    for n, s in spans.items():
        if n.startswith("excl"):
            others = [m for m, o in spans.items() if m != n and overlap(s, o)]
            assert not others, f"exclusive test {n} ran alongside {others}"
    plain = [s for n, s in spans.items() if n.startswith("plain")]
    assert any(overlap(a, b) for i, a in enumerate(plain) for b in plain[i + 1:]), \
        "the plain tests never ran side by side: the run was not parallel"
