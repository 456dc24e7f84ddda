"""The systemd units pass the real `systemd-analyze verify` and `security --offline`; install.sh is idempotent."""
import hashlib
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deployment"
UNITS = ["cryptobot.service", "cryptobot-audit.service", "cryptobot-audit.timer"]
SYSTEM_UNITS = next((p for p in (Path("/lib/systemd/system"), Path("/usr/lib/systemd/system")) if p.is_dir()), None)

needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None or SYSTEM_UNITS is None,
                                   reason="systemd-analyze not installed on this machine")


def staged_root(tmp_path: Path, units=UNITS, unit_dir=DEPLOY) -> Path:
    """A filesystem root holding the system's own units, our units, and an executable where the venv's
    `cryptobot` will be, so `verify` checks the unit files exactly as install.sh installs them."""
    root = tmp_path / "root"
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for u in units:
        shutil.copy(unit_dir / u, root / "etc/systemd/system" / u)
    exe = root / "opt/cryptobot/venv/bin/cryptobot"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    return root


def verify(root: Path, units) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", f"--root={root}", *[f"/etc/systemd/system/{u}" for u in units]],
                          capture_output=True, text=True, timeout=120)


@needs_systemd
def test_units_verify_clean(tmp_path):
    r = verify(staged_root(tmp_path), UNITS)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr


@needs_systemd
def test_verify_catches_a_broken_unit(tmp_path):
    "The check can fail: a unit with a misspelt directive and a missing binary is reported."
    broken = tmp_path / "units"
    broken.mkdir()
    text = (DEPLOY / "cryptobot.service").read_text()
    (broken / "cryptobot.service").write_text(
        text.replace("Restart=always", "Restrat=always").replace("/opt/cryptobot/venv/bin/cryptobot", "/opt/nope/cryptobot"))
    r = verify(staged_root(tmp_path, ["cryptobot.service"], broken), ["cryptobot.service"])
    assert "Restrat" in r.stderr and r.returncode != 0


@needs_systemd
@pytest.mark.parametrize("unit", ["cryptobot.service", "cryptobot-audit.service"])
def test_security_exposure_at_most_2(unit):
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", str(DEPLOY / unit)],
                       capture_output=True, text=True, timeout=120)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout)
    assert m, r.stdout[-500:] + r.stderr
    assert float(m.group(1)) <= 2.0, f"{unit} exposure {m.group(1)}"


def directives(unit: str) -> dict:
    out = {}
    for line in (DEPLOY / unit).read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def test_runner_unit_is_crash_proof_and_hardened():
    d = directives("cryptobot.service")
    assert d["Restart"] == ["always"] and d["User"] == ["cryptobot"]
    assert d["EnvironmentFile"] == ["/etc/cryptobot/cryptobot.env"]
    assert "CRYPTOBOT_STATE_DIR=/var/lib/cryptobot" in d["Environment"]
    for k, v in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
                 "PrivateDevices": "yes", "UMask": "0077", "CapabilityBoundingSet": ""}.items():
        assert d[k] == [v], k
    assert d["SystemCallFilter"][0] == "@system-service"
    timer = directives("cryptobot-audit.timer")
    assert timer["Unit"] == ["cryptobot-audit.service"] and timer["Persistent"] == ["true"]


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        h.update(f"{p.relative_to(root)} {stat.filemode(st.st_mode)}".encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def test_install_dry_run_changes_nothing(tmp_path):
    r = subprocess.run([str(DEPLOY / "install.sh"), "--dry-run", "--root", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "would: install -m 0644" in r.stdout and "nothing was changed" in r.stdout
    assert not (tmp_path / "r").exists()


def test_install_is_idempotent(tmp_path):
    root = tmp_path / "r"
    cmd = [str(DEPLOY / "install.sh"), "--root", str(root), "--skip-venv"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    env = root / "etc/cryptobot/cryptobot.env"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    assert stat.S_IMODE((root / "var/lib/cryptobot").stat().st_mode) == 0o700
    assert (root / "opt/cryptobot/src/pyproject.toml").exists() and not (root / "opt/cryptobot/src/.git").exists()
    env.write_text(env.read_text() + "\nBINANCE_API_KEY=mine\n")  # the user's edits survive a re-install
    before = tree_digest(root)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert tree_digest(root) == before
    assert "cryptobot.env exists (left as it is)" in second.stdout and "cryptobot.service up to date" in second.stdout
