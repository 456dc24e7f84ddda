"""Session plumbing for running the suite on both cores (`make test` runs `pytest -n 2`, pytest-xdist).

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
