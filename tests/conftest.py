"""Session plumbing for running the suite on both cores (`make test` runs `pytest -n 2 --dist loadfile`, pytest-xdist).

Scheduling: every test file is one unit (its module fixtures -- a trained model, an emulator, a fork server -- are
built once, on one worker), except the files of one GROUPS entry, which share a unit and so run on one worker, one
after the other: the SIGKILL soaks must never run beside each other (each forks runners against a live emulator under
a wall-clock budget).

A test marked `exclusive` asserts a wall-clock bound (a latency, a per-call cost, "returned at once"): under xdist it
runs while no other test of this session runs, so what it times is the code, not the other worker. Every other test
holds a shared lock for its setup, call and teardown; an exclusive test takes the lock alone (and a gate first, so
the other worker cannot keep it waiting by starting test after test). Without xdist nothing changes."""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

import pytest

try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:                      # without pytest-xdist the suite runs serially; nothing to schedule
    LoadScopeScheduling = None


GROUPS = {"sigkill": ("test_live_crash.py", "test_portfolio_soak.py", "test_stop_crash.py", "test_guardian_crash.py")}


def pytest_configure(config):
    config.addinivalue_line("markers", "exclusive: asserts a wall-clock bound; under xdist no other test of the "
                                       "session runs meanwhile (tests/conftest.py)")


class SessionLock:
    "Many shared holders or one exclusive holder, across the xdist workers of one session (flock on two files)."

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.gate = open(folder / "exclusive.gate", "a+")      # taken first: a waiting exclusive holder blocks newcomers
        self.main = open(folder / "exclusive.lock", "a+")

    @contextmanager
    def hold(self, exclusive: bool):
        fcntl.flock(self.gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(self.main, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            if not exclusive:
                fcntl.flock(self.gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(self.main, fcntl.LOCK_UN)
            if exclusive:
                fcntl.flock(self.gate, fcntl.LOCK_UN)


_lock: SessionLock | None = None


def session_lock(config) -> SessionLock | None:
    "The lock of this xdist session (its files beside the workers' basetemps, so other sessions never share it)."
    global _lock
    if _lock is None and os.environ.get("PYTEST_XDIST_WORKER"):
        _lock = SessionLock(config._tmp_path_factory.getbasetemp().parent / "locks")
    return _lock


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    lock = session_lock(item.config)
    if lock is None:
        return (yield)
    with lock.hold(item.get_closest_marker("exclusive") is not None):
        return (yield)


class FileGroupScheduling(LoadScopeScheduling if LoadScopeScheduling else object):
    """xdist's `--dist loadfile`, with the files of one GROUPS entry in one scope. (`--dist loadgroup` cannot do it
    here: xdist 3.8 marks a group by rewriting `item._nodeid`, which pytest 9.2 no longer reads.)"""

    def _split_scope(self, nodeid: str) -> str:
        path = nodeid.split("::", 1)[0]
        name = path.rsplit("/", 1)[-1]
        return next((g for g, files in GROUPS.items() if name in files), path)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") == "loadfile":
        return FileGroupScheduling(config, log)
