"""`make test` runs pytest on two workers (pytest-xdist, `--dist loadfile`, tests/conftest.py). A scratch suite with
this conftest, run the same way, records when and where each test runs: a test marked `exclusive` (a timed assertion)
overlaps no other test; each file stays on one worker (its module fixtures are built once); the SIGKILL soak files
share a worker and never overlap; and different files really run side by side (or the check proves nothing)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("xdist")
HERE = Path(__file__).resolve().parent

RECORD = '''
import os, time, pytest
def record(name):
    log, w = os.environ["XDIST_PROBE_LOG"], os.environ["PYTEST_XDIST_WORKER"]
    with open(log, "a") as f:
        f.write(f"{time.time():.6f} start {name} {w}\\n")
    time.sleep(0.4)
    with open(log, "a") as f:
        f.write(f"{time.time():.6f} end {name} {w}\\n")
'''
FILES = {
    "test_probe.py": RECORD + '''
@pytest.mark.exclusive
@pytest.mark.parametrize("i", range(3))
def test_a_timed(i):
    record(f"excl{i}")

@pytest.mark.exclusive
def test_c_timed_last():
    record("excl_last")
''',
    "test_plain_a.py": RECORD + '''
@pytest.mark.parametrize("i", range(4))
def test_a(i):
    record(f"a{i}")
''',
    "test_plain_b.py": RECORD + '''
@pytest.mark.parametrize("i", range(4))
def test_b(i):
    record(f"b{i}")
''',
    "test_live_crash.py": RECORD + '''
@pytest.mark.parametrize("i", range(2))
def test_soak(i):
    record(f"crash{i}")
''',
    "test_portfolio_soak.py": RECORD + '''
@pytest.mark.parametrize("i", range(2))
def test_soak(i):
    record(f"psoak{i}")
''',
}


def test_exclusive_tests_run_alone_and_files_stay_on_one_worker_under_two_workers(tmp_path):
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    for name, src in FILES.items():
        (tmp_path / name).write_text(src)
    log = tmp_path / "log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}     # this run may be a worker itself
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadfile", "-p", "no:cacheprovider",
                        str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**env, "XDIST_PROBE_LOG": str(log)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ev = {}
    for line in log.read_text().splitlines():
        t, kind, name, worker = line.split()
        ev.setdefault(name, {"worker": worker})[kind] = float(t)
    spans = {n: (e["start"], e["end"]) for n, e in ev.items()}
    assert len(spans) == 16, sorted(spans)
    overlap = lambda a, b: a[0] < b[1] and b[0] < a[1]  # noqa: E731
    for n, s in spans.items():
        if n.startswith("excl"):
            others = [m for m, o in spans.items() if m != n and overlap(s, o)]
            assert not others, f"exclusive test {n} ran alongside {others}"
    for prefix in ("a", "b", "crash", "psoak"):
        workers = {e["worker"] for n, e in ev.items() if n.rstrip("0123456789") == prefix}
        assert len(workers) == 1, f"the tests of one file ran on {workers}"
    soaks = [n for n in spans if n.startswith(("crash", "psoak"))]
    assert len({ev[n]["worker"] for n in soaks}) == 1, "the SIGKILL soak files ran on two workers"
    assert not any(overlap(spans[m], spans[n]) for m in soaks for n in soaks if m < n)
    plain = [n for n in spans if not n.startswith("excl")]
    assert any(ev[m]["worker"] != ev[n]["worker"] and overlap(spans[m], spans[n]) for m in plain for n in plain), \
        "no two tests ever ran side by side: the run was not parallel"
