"""The `cryptobot` command end to end, as a user runs it: real subprocesses, a real state dir, the emulator."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
SPOT = SHARED / "binance-spot_BTCUSDT_1h_2019-12-10_2020-12-10.csv"
CRYPTOBOT = str(Path(sys.executable).parent / "cryptobot")


def run(args, cwd, env=None, timeout=120):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("CRYPTOBOT_", "BINANCE_", "GO_LIVE"))}
    e.update(env or {})
    return subprocess.run([CRYPTOBOT, *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)


def one_error_line(r, command):
    "The last stderr line is the one clear error line, prefixed with the command."
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert lines, "no error printed"
    assert lines[-1].startswith(f"cryptobot {command}: "), lines[-1]
    assert "Traceback" not in r.stderr
    return lines[-1]


@pytest.mark.skipif(not SPOT.exists(), reason=f"shared data absent: {SPOT}")
def test_import_real_spot_file(tmp_path):
    r = run(["import", str(SPOT), "--symbol", "BTC/USDT", "--timeframe", "1h"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert re.search(r"gaps\s+6\b", r.stdout) and "longest 6h" in r.stdout
    assert (tmp_path / "data/raw/binance_BTC-USDT_1h.parquet").exists()


@pytest.mark.parametrize("content,needle", [
    ("", "empty"),
    ("timestamp,open,high,low,close,volume\n", "no candle rows"),
    ("timestamp,open,high,low,close\n2020-01-01 00:00:00,1,2,0.5,1\n", "volume"),
    ("timestamp,open,high,low,close,volume\n2020-01-01 00:00:00,1,0.5,2,1,1\n", "high < low"),
    ("timestamp,open,high,low,close,volume\nnot-a-time,1,2,0.5,1,1\n", "timestamp"),
])
def test_import_malformed_is_one_line_and_writes_nothing(tmp_path, content, needle):
    f = tmp_path / "in.csv"
    f.write_text(content)
    r = run(["import", str(f), "--symbol", "BTC/USDT", "--timeframe", "1h"], tmp_path)
    assert r.returncode == 1
    line = one_error_line(r, "import")
    assert "in.csv" in line and needle in line.lower(), line
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").rglob("*.parquet"))


def test_missing_file(tmp_path):
    r = run(["import", "nope.csv", "--symbol", "BTC/USDT", "--timeframe", "1h"], tmp_path)
    assert r.returncode == 1 and "nope.csv" in one_error_line(r, "import")


@pytest.mark.parametrize("env,key", [({"CRYPTOBOT_RISK_PCT": "5"}, "CRYPTOBOT_RISK_PCT"),
                                     ({"CRYPTOBOT_LEVERAGE": "3"}, "CRYPTOBOT_LEVERAGE"),
                                     ({"CRYPTOBOT_RISK_PCNT": "1"}, "CRYPTOBOT_RISK_PCNT")])
def test_bad_setting_exits_78_with_one_line(tmp_path, env, key):
    r = run(["status"], tmp_path, env=env)
    assert r.returncode == 78, r.stderr
    assert key in one_error_line(r, "status")


def test_secrets_never_printed(tmp_path):
    secret = "SECRETsecretSECRET0123456789"
    env = {"BINANCE_API_KEY": "KEYkeyKEY0123456789", "BINANCE_API_SECRET": secret, "CRYPTOBOT_RISK_PCT": "9"}
    r = run(["config"], tmp_path, env=env)
    assert r.returncode == 78 and secret not in r.stdout + r.stderr
    r = run(["config", "--json"], tmp_path, env={k: v for k, v in env.items() if k != "CRYPTOBOT_RISK_PCT"})
    assert r.returncode == 0, r.stderr
    assert secret not in r.stdout and "KEYkeyKEY0123456789" not in r.stdout


def test_status_and_unlock_on_a_real_state_dir(tmp_path):
    from cryptobot.config import load_settings
    from cryptobot.guardian import Guardian
    from cryptobot.journal import Journal

    env = {"CRYPTOBOT_STATE_DIR": str(tmp_path / "var")}
    r = run(["status", "--json"], tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["locked"] is False
    # lock the bot the way the kill switch does, in this process, then read it from a fresh one
    s = load_settings(env=env, dotenv_path=tmp_path / "absent.env")
    g = Guardian(s, s.state_dir, Journal(s.state_dir / "journal.sqlite"))
    for i in range(s.kill_switch_losses):
        g.record_trade({"trade_key": f"t{i}", "symbol": "BTC/USDT", "entry_time": f"2024-01-01T0{i}:00:00+00:00",
                        "exit_time": f"2024-01-01T0{i}:30:00+00:00", "entry_price": 100.0, "exit_price": 98.0,
                        "amount": 1.0, "fees": 0.2, "pnl": -2.2, "exit_reason": "stop"})
    assert g.locked
    r = run(["status"], tmp_path, env=env)
    assert r.returncode == 0 and "LOCKED" in r.stdout.upper()
    r = run(["unlock", "--reason", "  "], tmp_path, env=env)
    assert r.returncode == 1 and "reason" in one_error_line(r, "unlock").lower()
    r = run(["unlock", "--reason", "reviewed the three losses; market regime changed"], tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(run(["status", "--json"], tmp_path, env=env).stdout)["locked"] is False


def test_download_from_the_emulator_cli(tmp_path):
    "Two real processes: `cryptobot emulator` serving, `cryptobot download` fetching through ccxt on loopback."
    port = _free_port()
    emu = subprocess.Popen([CRYPTOBOT, "emulator", "--port", str(port), "--speed", "1"], cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = emu.stdout.readline()
        assert line.startswith(f"emulator ready: http://127.0.0.1:{port}"), line
        r = run(["download", "--url", f"http://127.0.0.1:{port}", "--since", "2020-01-01", "--quiet"], tmp_path)
        assert r.returncode == 0, r.stderr
        n = int(re.search(r"(\d+) new closed candles", r.stdout).group(1))
        assert n >= 999  # the emulator starts 1000 bars in; the forming one is not stored
        again = run(["download", "--url", f"http://127.0.0.1:{port}", "--quiet"], tmp_path)  # resumes
        assert again.returncode == 0 and int(re.search(r"(\d+) new", again.stdout).group(1)) < n
    finally:
        emu.terminate()
        emu.wait(timeout=20)
    assert emu.returncode == 0


def test_download_refuses_a_non_loopback_url(tmp_path):
    r = run(["download", "--url", "http://10.1.2.3:8765", "--since", "2020-01-01"], tmp_path)
    assert r.returncode == 1 and "loopback" in one_error_line(r, "download")


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_env_file_option(tmp_path):
    env_file = tmp_path / "cryptobot.env"
    env_file.write_text("CRYPTOBOT_RISK_PCT=0.5\nBINANCE_API_SECRET=FILEsecretFILE123456\n")
    env_file.chmod(0o600)
    r = run(["--env-file", str(env_file), "config", "--json"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["risk_pct"] == 0.5 and "FILEsecretFILE123456" not in r.stdout
    env_file.write_text("CRYPTOBOT_RISK_PCT=7\n")
    r = run(["--env-file", str(env_file), "config"], tmp_path)
    assert r.returncode == 78 and "CRYPTOBOT_RISK_PCT" in one_error_line(r, "config")


def test_second_runner_on_one_state_dir_is_refused_naming_the_first(tmp_path):
    "Two real `cryptobot run` processes on one state dir: the second exits non-zero with one line naming the first's"
    "PID; `cryptobot status` keeps working while the first runs; SIGTERM ends the first and frees the state dir."
    import signal
    from cryptobot import data as D, model as M
    from cryptobot.emulator import Emulator
    from cryptobot.guardian import RUNNER_LOCK_FILE, runner_lock
    c = D.synthetic_candles(n=2_200, seed=9)
    model = M.train_walk_forward(c.iloc[:1_900], n_folds=2, params={"max_iter": 20}).save(tmp_path / "models")
    emu = Emulator(c, clock="accelerated", speed=60.0, start=2_000, api_key="k-7f3a9c", api_secret="s-b81d2e")
    emu.start()
    sd = tmp_path / "var"
    env = {"CRYPTOBOT_STATE_DIR": str(sd), "CRYPTOBOT_EXCHANGE_URL": emu.base_url,
           "BINANCE_API_KEY": "k-7f3a9c", "BINANCE_API_SECRET": "s-b81d2e"}
    e = {k: v for k, v in os.environ.items() if not k.startswith(("CRYPTOBOT_", "BINANCE_", "GO_LIVE"))}
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen([CRYPTOBOT, "run", "--model", str(model)], cwd=tmp_path, env={**e, **env},
                             stdout=log, stderr=subprocess.STDOUT)
    try:
        end = time.time() + 90
        while "event=candle " not in (tmp_path / "first.log").read_text():      # trading: reconciled, one candle done
            assert first.poll() is None and time.time() < end, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.1)
        second = run(["run", "--model", str(model), "--max-candles", "1"], tmp_path, env=env, timeout=60)
        assert second.returncode != 0 and second.stdout == "", second.stdout[-2000:]
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0] == one_error_line(second, "run"), second.stderr
        assert f"another runner (pid {first.pid}) holds state dir {sd}" in lines[0], lines[0]
        st = run(["status", "--json"], tmp_path, env=env)
        assert st.returncode == 0 and json.loads(st.stdout)["entries_allowed"] is True, st.stderr
        assert first.poll() is None                                              # the first runner is untouched
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0, (tmp_path / "first.log").read_text()[-2000:]
        with runner_lock(sd):                                                    # released with the process
            assert (sd / RUNNER_LOCK_FILE).read_text().strip() == str(os.getpid())
    finally:
        if first.poll() is None:
            first.kill()
        log.close()
        emu.stop()


def test_status_says_locked_for_a_hand_lowered_streak_and_unlock_records_the_account(tmp_path):
    "`cryptobot status` (a fresh process) says LOCKED where the runner would refuse; `cryptobot unlock` records the"
    "OS account of its uid (not $USER) and $SUDO_USER beside it."
    import pwd
    from cryptobot.config import load_settings
    from cryptobot.guardian import Guardian
    from cryptobot.journal import Journal
    env = {"CRYPTOBOT_STATE_DIR": str(tmp_path / "var")}
    s = load_settings(env=env, dotenv_path=tmp_path / "absent.env")
    with Journal(s.state_dir / "journal.sqlite") as j:
        g = Guardian(s, s.state_dir, j)
        for i in range(s.kill_switch_losses - 1):
            g.record_trade({"trade_key": f"t{i}", "symbol": "BTC/USDT", "entry_time": f"2024-01-01T0{i}:00:00+00:00",
                            "exit_time": f"2024-01-01T0{i}:30:00+00:00", "entry_price": 100.0, "exit_price": 98.0,
                            "amount": 1.0, "fees": 0.2, "pnl": -2.2, "exit_reason": "stop"})
        g.note_candle(time.time() - 60, 10_000.0)
    before = run(["status"], tmp_path, env=env)
    assert before.returncode == 0 and before.stdout.splitlines()[1].startswith("lock       unlocked"), before.stdout
    st = json.loads((s.state_dir / "state.json").read_text())
    st["consecutive_losses"] = 0                                          # lowered by hand
    (s.state_dir / "state.json").write_text(json.dumps(st))
    r = run(["status"], tmp_path, env=env)
    head = r.stdout.splitlines()[1]
    assert r.returncode == 0 and head.startswith("LOCKED") and "entries allowed" not in r.stdout, r.stdout
    assert f"loss streak 0 in state.json, {s.kill_switch_losses - 1} in the journal" in head, head
    assert json.loads(run(["status", "--json"], tmp_path, env=env).stdout)["entries_allowed"] is False
    sudo = pwd.getpwuid(0).pw_name                      # $SUDO_USER is believed only for an account that exists
    r = run(["unlock", "--reason", "reviewed the edit"], tmp_path, env={**env, "USER": "mallory", "LOGNAME": "mallory",
                                                                        "SUDO_USER": sudo})
    me = pwd.getpwuid(os.getuid()).pw_name
    assert r.returncode == 0 and f"unlocked by {me} (uid {os.getuid()}, SUDO_USER={sudo})" in r.stdout, r.stdout + r.stderr
    with Journal(s.state_dir / "journal.sqlite", readonly=True) as j:
        assert j.last_events(1, kind="unlock")[0]["data"]["who"] == f"{me} (uid {os.getuid()}, SUDO_USER={sudo})"
    assert run(["status"], tmp_path, env=env).stdout.splitlines()[1] == "lock       unlocked: entries allowed"


# ------------------------------------------------------------------ issue 9: fail closed (items 1, 2, 7)
_ROWS = "".join(f"2020-01-01 {h:02d}:00:00,100,101,99,100.5,5\n" for h in range(5))


@pytest.mark.parametrize("last", ["1e400,1e400,99,1e400,5", "inf,inf,99,inf,5", "-inf,101,-inf,-inf,5",
                                  "100,101,99,100.5,inf", "100,101,99,100.5,1e400", "100,101,99,100.5,-inf"])
def test_import_non_finite_is_refused_and_writes_nothing(tmp_path, last):
    f = tmp_path / "in.csv"
    f.write_text("timestamp,open,high,low,close,volume\n" + _ROWS + f"2020-01-01 05:00:00,{last}\n")
    r = run(["import", str(f), "--symbol", "BTC/USDT", "--timeframe", "1h"], tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    line = one_error_line(r, "import")
    assert "in.csv" in line and "non-finite" in line and "2020-01-01 05:00" in line and "nothing written" in line
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").rglob("*.parquet"))


def test_import_of_a_fifo_returns_at_once_with_one_line(tmp_path):
    fifo = tmp_path / "candles.csv"
    os.mkfifo(fifo)
    r = run(["import", str(fifo), "--symbol", "BTC/USDT", "--timeframe", "1h"], tmp_path, timeout=30)
    assert r.returncode == 1 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1, r.stderr
    line = one_error_line(r, "import")
    assert str(fifo) in line and "not a regular file" in line, line
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("what", ["missing", "directory", "fifo"])
def test_env_file_that_is_not_a_file_exits_78(tmp_path, what):
    p = tmp_path / "cryptobot.env"
    if what == "directory":
        p.mkdir()
    elif what == "fifo":
        os.mkfifo(p)
    r = run(["--env-file", str(p), "config"], tmp_path, timeout=30)
    assert r.returncode == 78, r.stdout + r.stderr
    assert r.stdout == "" and len(r.stderr.splitlines()) == 1, r.stderr
    line = one_error_line(r, "config")
    assert "--env-file" in line and str(p) in line, line


@pytest.mark.parametrize("value", ["１.０", "٠.٥", "１", "1.٥"])
def test_non_ascii_digits_exit_78_naming_the_key(tmp_path, value):
    r = run(["config"], tmp_path, env={"CRYPTOBOT_RISK_PCT": value})
    assert r.returncode == 78, r.stdout + r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert "CRYPTOBOT_RISK_PCT" in one_error_line(r, "config")


def test_dotenv_permission_warning_is_one_line(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("CRYPTOBOT_RISK_PCT=0.5\n")
    env_file.chmod(0o644)
    r = run(["config"], tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr                                   # no source-code line after it
    assert "chmod 600" in lines[0] and "mode 644" in lines[0] and lines[0].startswith("warning: "), lines
    assert "load_settings" not in r.stderr and ".py:" not in r.stderr


def test_refused_import_prints_one_line_and_keeps_the_report_behind_a_flag(tmp_path):
    "Issue 18 case 10: a file that is read and refused gives one line (what is wrong, what to do) on stderr and "
    "nothing on stdout; `--report FILE` writes the full validation report, `--verbose` prints it before the line."
    f = tmp_path / "in.csv"
    f.write_text("timestamp,open,high,low,close,volume\n" + _ROWS + "2020-01-01 05:00:00,100,99,101,100,5\n")
    args = ["import", str(f), "--symbol", "BTC/USDT", "--timeframe", "1h"]
    r = run(args, tmp_path)
    assert r.returncode == 1 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1, r.stderr
    line = one_error_line(r, "import")
    assert "in.csv" in line and "high < low" in line and "nothing written" in line and "--report FILE" in line
    rep = tmp_path / "report.txt"
    r = run(args + ["--report", str(rep)], tmp_path)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and f"full report in {rep}" in r.stderr
    report = rep.read_text()
    assert "status    REFUSED" in report and re.search(r"high < low\s+1\s+first 2020-01-01 05:00", report)
    r = run(args + ["--verbose"], tmp_path)
    assert r.returncode == 1 and r.stderr.splitlines()[:-1] == report.rstrip("\n").splitlines()
    assert one_error_line(r, "import") == line.split("; for the full report")[0]
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").rglob("*.parquet"))
