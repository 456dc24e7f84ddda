"""The README's two commands on a fresh machine: the Makefile's install and browser recipes, run for real.

A green CI on a machine that already had Chromium once hid a broken install step (`$SUDO VAR=value cmd` is a
command named `VAR=value` when `SUDO` is empty). These tests run the recipes themselves."""
import hashlib
import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="make not installed")


def run_make(args, cwd=ROOT, env=None, timeout=600):
    return subprocess.run([MAKE, "--no-print-directory", *args], cwd=cwd, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def fake_tree(tmp_path: Path) -> Path:
    """The Makefile and pyproject.toml in a scratch folder, with a `.venv/bin/python` that only records its calls."""
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    bin_ = tmp_path / ".venv" / "bin"
    bin_.mkdir(parents=True)
    (bin_ / "python").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\n')
    (bin_ / "python").chmod(0o755)
    return tmp_path


def test_install_is_keyed_on_content_not_mtime(tmp_path):
    "nbdev-export rewrites pyproject.toml with the same bytes: that must not reinstall; a real change must."
    t = fake_tree(tmp_path)
    calls = t / "calls"
    r = run_make(["install"], cwd=t)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "install" in calls.read_text() and "-e" in calls.read_text()      # first run installs
    stamp = (t / ".venv" / ".installed").read_text().strip()
    assert stamp == hashlib.sha1((t / "pyproject.toml").read_bytes()).hexdigest()
    calls.unlink()
    os.utime(t / "pyproject.toml")                                          # what nbdev-export does
    r = run_make(["install"], cwd=t)
    assert r.returncode == 0 and not calls.exists(), "an mtime-only change of pyproject.toml reinstalled"
    (t / "pyproject.toml").write_text((t / "pyproject.toml").read_text() + "\n# a new dependency\n")
    r = run_make(["install"], cwd=t)
    assert r.returncode == 0 and calls.exists(), "a content change of pyproject.toml did not reinstall"


def test_failed_install_leaves_no_stamp(tmp_path):
    "A pip failure must not be remembered as an install: the next run tries again."
    t = fake_tree(tmp_path)
    (t / ".venv" / "bin" / "python").write_text("#!/bin/sh\nexit 1\n")
    r = run_make(["install"], cwd=t)
    assert r.returncode != 0 and not (t / ".venv" / ".installed").exists()


def shim(tmp_path: Path, name: str, body: str) -> None:
    p = tmp_path / "shims" / name
    p.parent.mkdir(exist_ok=True)
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(0o755)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("apt-get") is None, reason="needs root and apt-get")
def test_browser_recipe_installs_as_root_with_chromium_missing(tmp_path):
    """`make browser` with CHROMIUM pointing at a missing path runs the real apt-get install as root (SUDO empty).
    Fails on the old recipe with "DEBIAN_FRONTEND=noninteractive: command not found"."""
    r = run_make(["browser", f"CHROMIUM={tmp_path}/missing/chromium"])
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "command not found" not in out and "FAIL" not in out
    assert Path("/usr/bin/chromium").exists()


def test_browser_recipe_as_a_sudo_user(tmp_path):
    """As a non-root user the recipe goes through `sudo -n env VAR=value apt-get ...` (never prompts).
    `id`, `sudo` and `apt-get` are shims that record what the recipe asked for."""
    shim(tmp_path, "id", 'echo 1000\n')
    shim(tmp_path, "sudo", f'echo "sudo $*" >> {tmp_path}/calls; shift; exec "$@"\n')
    shim(tmp_path, "apt-get", f'echo "apt-get $* DEBIAN_FRONTEND=$DEBIAN_FRONTEND" >> {tmp_path}/calls\n')
    env = {"PATH": f"{tmp_path}/shims:{os.environ['PATH']}"}
    r = run_make(["browser", f"CHROMIUM={tmp_path}/missing/chromium"], env=env)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert any(c.startswith("sudo -n env DEBIAN_FRONTEND=noninteractive apt-get update") for c in calls), calls
    assert any("apt-get install" in c and "chromium" in c and c.endswith("DEBIAN_FRONTEND=noninteractive")
               for c in calls), calls
    # the shim installs nothing: the recipe must notice the browser is still absent, unless it already was there
    if not Path("/usr/bin/chromium").exists():
        assert r.returncode != 0 and "FAIL" in r.stdout + r.stderr


def test_browser_recipe_without_root_or_sudo_fails_in_one_line(tmp_path):
    shim(tmp_path, "id", 'echo 1000\n')
    # a PATH without sudo: only the shims and the basic tools the recipe needs
    tools = tmp_path / "tools"
    tools.mkdir()
    for t in ("bash", "sh", "env", "echo", "test", "cat"):
        w = shutil.which(t)
        if w:
            (tools / t).symlink_to(w)
    r = run_make(["browser", f"CHROMIUM={tmp_path}/missing/chromium"],
                 env={"PATH": f"{tmp_path}/shims:{tools}"})
    assert r.returncode != 0
    fail = [l for l in (r.stdout + r.stderr).splitlines() if l.startswith("FAIL")]
    assert len(fail) == 1 and "neither root nor has sudo" in fail[0], r.stdout + r.stderr


def test_pytest_recipe_runs_on_every_core_with_xdist(tmp_path):
    """`make pytest` runs the suite through pytest-xdist (`-n` workers, `--dist loadfile`): the suite takes
    ~35 min on one core and must stay within `make test`'s 10 minutes. The recipe is run for real on a scratch copy
    whose `python` records its arguments; pytest-xdist must be a dev dependency so a fresh clone has it."""
    t = fake_tree(tmp_path)
    r = run_make(["install"], cwd=t)                                        # the stamp: the next make skips pip
    assert r.returncode == 0, r.stdout + r.stderr
    (t / "calls").unlink()
    # OpenMP's thread limits (the crash tests set OMP_NUM_THREADS=1; users do too) lower `nproc`, not the cores
    r = run_make(["pytest", f"CHROMIUM={shutil.which('sh')}"], cwd=t, env={"OMP_NUM_THREADS": "1", "OMP_THREAD_LIMIT": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    args = (t / "calls").read_text().split()
    assert args[:2] == ["-m", "pytest"], args
    assert "-n" in args, f"make pytest runs without pytest-xdist: {args}"
    n = args[args.index("-n") + 1]
    assert n == str(min(len(os.sched_getaffinity(0)), 4)), f"-n {n}: one worker per core (at most 4) expected"
    assert args[args.index("--dist") + 1] == "loadfile", args       # files and the soaks grouped: tests/conftest.py
    r = run_make(["pytest", f"CHROMIUM={shutil.which('sh')}", "PYTEST_WORKERS=3"], cwd=t)
    last = (t / "calls").read_text().splitlines()[-1].split()
    assert last[last.index("-n") + 1] == "3", last                        # overridable: make test PYTEST_WORKERS=N
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    assert any(d.replace(" ", "").startswith("pytest-xdist") for d in dev), dev
