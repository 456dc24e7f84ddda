"""One integrity answer (issue 18, cases 3-6 and 10): a damaged, unreadable or read-only journal or state dir, and a
used state dir that lost its memory, are LOCKED with one line in `cryptobot status`, the dashboard and the audit, and
`cryptobot run` refuses them with that line, exit 78, before it sends anything. The runner lock cannot be deleted away.
Real processes: the `cryptobot` command, the emulator on loopback, the real ccxt client."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cryptobot.config import Settings
from cryptobot.guardian import Guardian
from cryptobot.journal import ClosedTrade, Journal

CRYPTOBOT = str(Path(sys.executable).parent / "cryptobot")
KEY, SECRET = "k-integ-4e1f", "s-integ-9a7c"


def cli(args, cwd, env, timeout=120):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("CRYPTOBOT_", "BINANCE_", "GO_LIVE"))}
    return subprocess.run([CRYPTOBOT, *args], cwd=cwd, env={**e, **env}, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    "A small model and an accelerated emulator (the runner's exchange)."
    from cryptobot import data as D, model as M
    from cryptobot.emulator import Emulator
    c = D.synthetic_candles(n=2_200, seed=9)
    model = M.train_walk_forward(c.iloc[:1_900], n_folds=2, params={"max_iter": 20}).save(
        tmp_path_factory.mktemp("models"))
    emu = Emulator(c, clock="accelerated", speed=60.0, start=2_000, api_key=KEY, api_secret=SECRET)
    emu.start()
    yield model, emu
    emu.stop()


def used_state_dir(root: Path) -> Path:
    """A state dir a bot has used: a journal of several hundred KiB (a trade, a lock, padding events) and state.json,
    in a folder other users may traverse (for the `nobody` test)."""
    os.chmod(root, 0o755)
    sd = root / "var"
    sd.mkdir()
    s = Settings(state_dir=sd)
    t0 = time.time() - 7200
    with Journal(sd / "journal.sqlite") as j:
        g = Guardian(s, sd, j)
        g.record_trade(ClosedTrade("t0", "BTC/USDT", t0, t0 + 60, 100.0, 101.0, 1.0, 0.2, 0.8, "signal"))
    con = __import__("sqlite3").connect(sd / "journal.sqlite")
    with con:
        con.executemany("INSERT INTO events (ts, kind, message, data) VALUES (?, 'padding', ?, NULL)",
                        [(t0 + i, f"padding row {i} " + "x" * 200) for i in range(3000)])
    con.close()                                                     # the last connection checkpoints the WAL
    assert (sd / "journal.sqlite").stat().st_size > 500_000 and not (sd / "journal.sqlite-wal").exists()
    return sd


def flip(p: Path, at: int, n: int):
    b = bytearray(p.read_bytes())
    b[at:at + n] = bytes(x ^ 0xFF for x in b[at:at + n])
    p.write_bytes(bytes(b))


def damage(sd: Path, case: str):
    jp = sd / "journal.sqlite"
    if case == "page_4k_mid":
        flip(jp, jp.stat().st_size // 2 // 4096 * 4096, 4096)           # one whole page in the middle of the file
    elif case == "offset_100":
        flip(jp, 100, 16)                                                 # page 1's b-tree header (the schema's page)
    elif case == "zero_bytes":
        jp.write_bytes(b"")
    elif case == "dir_000":
        os.chmod(sd, 0o000)
    elif case == "dir_555":
        os.chmod(sd, 0o555)
    elif case == "file_000":
        os.chmod(jp, 0o000)
    elif case == "used_dir_no_memory":                                    # journal and state.json deleted, the rest kept
        jp.unlink()
        (sd / "state.json").unlink()
        (sd / "runner.lock").write_text("4242\n")
    else:
        raise AssertionError(case)


# case -> what the one line must say (besides the path)
CASES = {
    "page_4k_mid": ("damaged", "move it aside"),
    "offset_100": ("damaged", "move it aside"),
    "zero_bytes": ("0 bytes", "move it aside"),
    "dir_000": ("mode 0000", "do not move it aside"),
    "dir_555": ("mode 0555", "do not move it aside"),
    "file_000": ("mode 0000", "do not move it aside"),
    "used_dir_no_memory": ("used state dir", "new empty state dir"),
}


def listing(sd: Path):
    "Names and contents of the state dir (its mode put back as found)."
    mode = sd.stat().st_mode & 0o7777
    os.chmod(sd, 0o755)
    try:
        return sorted((p.name, _digest(p)) for p in sd.iterdir())
    finally:
        os.chmod(sd, mode)


def _digest(p: Path) -> str:
    try:
        return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    except PermissionError:
        return f"mode {p.stat().st_mode & 0o7777:04o}"


@pytest.mark.parametrize("case", list(CASES))
def test_status_dashboard_audit_and_runner_give_the_same_locked_line(world, tmp_path, case):
    model, emu = world
    sd = used_state_dir(tmp_path)
    damage(sd, case)
    env = {"CRYPTOBOT_STATE_DIR": str(sd), "CRYPTOBOT_EXCHANGE_URL": emu.base_url, "BINANCE_API_KEY": KEY,
           "BINANCE_API_SECRET": SECRET}
    try:
        # status: the LOCKED report, never a crash; exit 0 as for any other lock
        r = cli(["status"], tmp_path, env)
        assert r.returncode == 0 and r.stderr == "", (r.returncode, r.stderr)
        head = r.stdout.splitlines()[1]
        assert head.startswith("LOCKED") and all(w in head for w in CASES[case]), r.stdout
        assert "entries allowed" not in r.stdout and "position   flat" not in r.stdout, r.stdout
        assert "position   unknown" in r.stdout
        d = json.loads(cli(["status", "--json"], tmp_path, env).stdout)
        line = d["integrity"]
        assert d["locked"] and d["lock_reasons"] == [line] and str(sd) in line and d["open_positions"] is None, d
        assert line in head and r.stdout.count(line) == 1                  # one line, not repeated below
        # the dashboard and the audit: the same line, from the same gate
        from cryptobot.audit import Evidence, check_state_matches_journal, check_state_valid
        from cryptobot.monitor import snapshot, status_html
        s = Settings(state_dir=sd)
        snap = snapshot(s)
        assert snap["status"]["lock_reason"] == line and '<span id="cbm-lock">LOCKED</span>' in status_html(snap)
        ev = Evidence(s, ask_exchange=False, backtest=False)
        try:
            valid, matches = check_state_valid(ev), check_state_matches_journal(ev)
        finally:
            ev.close()
        assert valid.status == "FAIL" and line in valid.evidence, valid
        assert matches.status == "FAIL" and matches.evidence == line, matches
        # the runner: exit 78 with that line, before the lock, the journal or any order
        before, orders = listing(sd), emu.orders_created
        run = cli(["run", "--model", str(model), "--max-candles", "1"], tmp_path, env)
        out = run.stdout + run.stderr
        refused = [l for l in out.splitlines() if "event=startup_refused" in l]
        assert run.returncode == 78 and len(refused) == 1, out[-3000:]
        assert "code=78" in refused[0] and all(w in refused[0] for w in CASES[case]) and str(sd) in refused[0], out
        assert "Traceback" not in out and "unexpected" not in out and "event=startup " not in out, out[-3000:]
        assert emu.orders_created == orders
        assert listing(sd) == before                                      # nothing created, nothing touched
    finally:
        os.chmod(sd, 0o755)
        if (sd / "journal.sqlite").exists():
            os.chmod(sd / "journal.sqlite", 0o644)


def test_status_says_position_unknown_when_the_journal_is_deleted(tmp_path):
    "Journal deleted while state.json knows trades: LOCKED (as before) and the position is unknown, not flat."
    sd = used_state_dir(tmp_path)
    for p in sd.glob("journal.sqlite*"):
        p.unlink()
    r = cli(["status"], tmp_path, {"CRYPTOBOT_STATE_DIR": str(sd)})
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.splitlines()[1].startswith("LOCKED") and "journal is empty or missing" in r.stdout
    assert "position   unknown" in r.stdout and "position   flat" not in r.stdout, r.stdout


def test_a_new_empty_state_dir_is_believed(tmp_path):
    "The control: an absent or empty state dir is `never run`, entries allowed (what the used one must not be)."
    for sd in (tmp_path / "absent", tmp_path / "empty"):
        if sd.name == "empty":
            sd.mkdir()
        r = cli(["status", "--json"], tmp_path, {"CRYPTOBOT_STATE_DIR": str(sd)})
        d = json.loads(r.stdout)
        assert r.returncode == 0 and d["never_run"] and not d["locked"] and d["integrity"] is None, d
    assert not (tmp_path / "absent").exists()


STATUS_AS_NOBODY = """import os, shlex, sys, cryptobot.cli, cryptobot.live, cryptobot.monitor
os.setgroups([]); os.setgid(65534); os.setuid(65534)
assert os.getuid() == 65534
sys.exit(cryptobot.cli.main(["status"]))
"""


def test_status_as_a_user_who_may_not_read_the_state_dir(tmp_path):
    "Mode 0700 state dir of root, status run by `nobody`: [Errno 13], LOCKED, not a crash (root ignores the bits)."
    if os.geteuid() != 0:
        pytest.skip("needs root to run status as another user (nobody)")
    sd = used_state_dir(tmp_path)
    os.chmod(sd, 0o700)
    r = subprocess.run([sys.executable, "-c", STATUS_AS_NOBODY], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "CRYPTOBOT_STATE_DIR": str(sd)}, cwd=tempfile.gettempdir())
    os.chmod(sd, 0o755)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    head = r.stdout.splitlines()[1]
    assert head.startswith("LOCKED") and "[Errno 13 EACCES] Permission denied" in head and str(sd) in head, r.stdout
    assert "do not move it aside" in head and "position   unknown" in r.stdout


def test_read_only_mount_is_locked_in_status_and_refused_by_the_runner(world, tmp_path):
    "The state dir on a read-only bind mount (private mount namespace): EROFS in status; the runner exits 78 unstarted."
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare for a private read-only bind mount")
    model, emu = world
    sd = used_state_dir(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind -o ro {sd} {ro} && touch {ro}/x"],
                           capture_output=True, text=True)
    if "Read-only file system" not in probe.stderr:
        pytest.skip(f"no private read-only bind mount here: {probe.stderr.strip()[:200]}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CRYPTOBOT_", "BINANCE_", "GO_LIVE"))}
    env.update(CRYPTOBOT_STATE_DIR=str(ro), CRYPTOBOT_EXCHANGE_URL=emu.base_url, BINANCE_API_KEY=KEY,
               BINANCE_API_SECRET=SECRET)
    wrap = ["unshare", "-m", "sh", "-c", f'mount --bind -o ro {sd} {ro} && exec "$0" "$@"', CRYPTOBOT]
    before, orders = listing(sd), emu.orders_created
    st = subprocess.run(wrap + ["status"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    head = st.stdout.splitlines()[1]
    assert st.returncode == 0 and head.startswith("LOCKED") and "[Errno 30 EROFS]" in head, (st.stdout, st.stderr)
    assert "remount it read-write" in head and str(ro) in head and "do not move it aside" in head
    run = subprocess.run(wrap + ["run", "--model", str(model), "--max-candles", "1"], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=120)
    out = run.stdout + run.stderr
    refused = [l for l in out.splitlines() if "event=startup_refused" in l]
    assert run.returncode == 78 and len(refused) == 1 and "EROFS" in refused[0], out[-3000:]
    assert emu.orders_created == orders and listing(sd) == before


def test_deleting_runner_lock_does_not_let_a_second_runner_in(world, tmp_path):
    "Runner A holds the state dir; `rm runner.lock`; runner B (by the same path and through a symlink) is refused in"
    "one line naming A's PID; `journal archive` is refused too. After A stops, the dir is free again."
    model, emu = world
    sd = tmp_path / "var"
    env = {"CRYPTOBOT_STATE_DIR": str(sd), "CRYPTOBOT_EXCHANGE_URL": emu.base_url, "BINANCE_API_KEY": KEY,
           "BINANCE_API_SECRET": SECRET}
    e = {k: v for k, v in os.environ.items() if not k.startswith(("CRYPTOBOT_", "BINANCE_", "GO_LIVE"))}
    log = open(tmp_path / "a.log", "w")
    a = subprocess.Popen([CRYPTOBOT, "run", "--model", str(model)], cwd=tmp_path, env={**e, **env}, stdout=log,
                         stderr=subprocess.STDOUT)
    try:
        end = time.time() + 90
        while "event=startup_reconciled" not in (tmp_path / "a.log").read_text():
            assert a.poll() is None and time.time() < end, (tmp_path / "a.log").read_text()[-3000:]
            time.sleep(0.1)
        assert (sd / "runner.lock").read_text().strip() == str(a.pid)
        (sd / "runner.lock").unlink()
        (tmp_path / "link").symlink_to(sd)
        for where in (sd, tmp_path / "link"):
            b = cli(["run", "--model", str(model), "--max-candles", "1"], tmp_path,
                    {**env, "CRYPTOBOT_STATE_DIR": str(where)}, timeout=60)
            lines = [l for l in b.stderr.splitlines() if l.strip()]
            assert b.returncode != 0 and len(lines) == 1 and lines[0].startswith("cryptobot run: "), b.stderr
            assert f"another runner (pid {a.pid}) holds state dir {where}" in lines[0], lines[0]
            assert "event=candle " not in b.stdout and "event=startup " not in b.stdout, b.stdout[-2000:]
        arc = cli(["journal", "archive", "--before", "2000-01-01"], tmp_path, env)
        assert arc.returncode != 0 and f"(pid {a.pid})" in arc.stderr and "archive refused" in arc.stderr, arc.stderr
        assert a.poll() is None
        a.send_signal(signal.SIGTERM)
        assert a.wait(timeout=60) == 0, (tmp_path / "a.log").read_text()[-2000:]
        arc = cli(["journal", "archive", "--before", "2000-01-01"], tmp_path, env)
        assert arc.returncode == 0, arc.stderr
    finally:
        if a.poll() is None:
            a.kill()
        log.close()


@pytest.mark.parametrize("how", ["notify_url", "mode", "no_model"])
def test_a_start_refused_for_its_settings_creates_nothing(world, tmp_path, how):
    "A malformed alert URL, `cryptobot live` without GO_LIVE, no model artifact: exit 78, and no state dir, no lock."
    model, emu = world
    sd = tmp_path / "var"
    env = {"CRYPTOBOT_STATE_DIR": str(sd), "CRYPTOBOT_EXCHANGE_URL": emu.base_url, "CRYPTOBOT_DATA_DIR":
           str(tmp_path / "data")}
    args = ["run", "--model", str(model), "--max-candles", "1"]
    if how == "notify_url":
        env["CRYPTOBOT_NOTIFY_URLS"] = "nosuchscheme://token@example.com"
    elif how == "mode":
        args[0] = "live"
    else:
        args = ["run", "--max-candles", "1"]
    r = cli(args, tmp_path, env)
    assert r.returncode == 78, (r.stdout + r.stderr)[-2000:]
    out = r.stdout + r.stderr                          # the runner's refusal, or the settings' one line before it
    assert "startup_refused" in out or (how == "notify_url" and out.count("\n") == 1
                                        and "CRYPTOBOT_NOTIFY_URLS" in out and "token" not in out), out
    assert not sd.exists(), sorted(p.name for p in sd.iterdir())
