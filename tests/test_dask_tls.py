"Dask beyond loopback: plain tcp:// is refused off this machine, tls:// runs with Dask's certificates (real processes)."

import http.client
import ipaddress
import os
import re
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from pathlib import Path

from cryptobot.data import synthetic_candles
from cryptobot.sweep import DASK_TLS, SchedulerRefused, parse_grid, run_sweep, scheduler_security

from test_sweep import SWEEP_KW, _cli, _figures

LOOPBACK = ["tcp://127.0.0.1:8786", "tcp://127.0.0.1", "tcp://127.8.9.10:1", "tcp://localhost:8786", "tcp://LOCALHOST:1",
            "tcp://[::1]:8786", "ws://127.0.0.1:8786", "inproc://10.1.2.3/1/2"]
BEYOND = ["tcp://203.0.113.5:8786", "tcp://0.0.0.0:8786", "tcp://10.0.0.5:8786", "tcp://[2001:db8::1]:8786",
          "tcp://[::]:8786", "tcp://scheduler.lan:8786", "tcp://localhost.attacker.example:8786", "tcp://127.0.0.1.nip.io:1",
          "tcp://:8786", "ws://192.168.1.10:8786"]


@pytest.mark.parametrize("addr", LOOPBACK)
def test_loopback_plain_addresses_are_accepted_without_a_warning(addr):
    said = []
    assert scheduler_security(addr, env={}, warn=said.append) is None and said == []


@pytest.mark.parametrize("addr", BEYOND)
def test_plain_addresses_beyond_loopback_are_refused_unless_the_user_says_so(addr):
    said = []
    with pytest.raises(SchedulerRefused, match="--insecure-scheduler") as e:
        scheduler_security(addr, env={}, warn=said.append)
    assert "\n" not in str(e.value) and said == []
    assert scheduler_security(addr, insecure=True, env={}, warn=said.append) is None
    assert len(said) == 1 and "\n" not in said[0] and said[0].startswith("WARNING: --insecure-scheduler") and addr in said[0]


def _pem_files(d, sec, name):
    "The CA, certificate and key of a `Security.temporary()` as PEM files (what `dask scheduler` and the CLI take)."
    d.mkdir(exist_ok=True)
    out = {}
    for k, v in (("ca", sec.tls_ca_file), ("cert", sec.tls_client_cert), ("key", sec.tls_client_key)):
        out[k] = str(d / f"{name}-{k}.pem")
        with open(out[k], "w") as f:
            f.write(v)
    os.chmod(out["key"], 0o600)
    return out


def test_tls_needs_all_three_readable_files_from_flags_or_environment(tmp_path):
    from distributed.security import Security
    f = _pem_files(tmp_path, Security.temporary(), "ok")
    for drop in DASK_TLS:                       # any one of the three missing: refused, naming it and its variable
        with pytest.raises(SchedulerRefused, match=f"missing {DASK_TLS[drop][0]} \\(or {DASK_TLS[drop][1]}\\)"):
            scheduler_security("tls://10.0.0.5:8786", {k: v for k, v in f.items() if k != drop}, env={})
    with pytest.raises(SchedulerRefused, match="--tls-key /nonexistent/key.pem: not a readable file"):
        scheduler_security("tls://10.0.0.5:8786", {**f, "key": "/nonexistent/key.pem"}, env={})
    with pytest.raises(SchedulerRefused, match="use tls://10.0.0.5:8786"):   # certificates with a plain address
        scheduler_security("tcp://10.0.0.5:8786", f, insecure=True, env={})
    env = {var: f[k] for k, (_, var) in DASK_TLS.items()}
    for sec in (scheduler_security("tls://10.0.0.5:8786", f, env={}), scheduler_security("wss://10.0.0.5:8786", env=env),
                scheduler_security("tls://10.0.0.5:8786", {"ca": f["ca"]}, env={**env, "CRYPTOBOT_DASK_TLS_CA": "/x"})):
        assert sec.require_encryption and (sec.tls_ca_file, sec.tls_client_cert, sec.tls_client_key) == (
            f["ca"], f["cert"], f["key"])                                   # a flag wins over its variable


# The CLI cases name only wildcard addresses (a regression that connected would reach this machine, never a network).
@pytest.mark.parametrize("args,says", [
    (["--scheduler", "tcp://[::]:8786"], "--insecure-scheduler"),
    (["--scheduler", "tcp://0.0.0.0:8786"], "--insecure-scheduler"),
    (["--scheduler", "tls://0.0.0.0:8786"], "missing --tls-ca-file (or CRYPTOBOT_DASK_TLS_CA), --tls-cert"),
    (["--scheduler", "tls://0.0.0.0:8786", "--tls-ca-file", "ca.pem", "--tls-cert", "c.pem", "--tls-key", "k.pem"],
     "--tls-ca-file ca.pem: not a readable file"),
    (["--scheduler", "tcp://127.0.0.1:8786", "--tls-ca-file", "ca.pem"], "use tls://127.0.0.1:8786")])
def test_cli_sweep_refuses_an_unsafe_scheduler_in_one_line_with_exit_78(tmp_path, args, says):
    p = _cli(["sweep", "--data", "synthetic", "--n-synthetic", "2000", "--grid", "fast=5,10", "--grid", "slow=30",
              "--id", "x", *args], tmp_path)
    assert p.returncode == 78 and says in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "data" / "sweeps").exists() and not (tmp_path / "reports").exists()


def _readme_dask(kind: str, subst: dict) -> list[str]:
    "The README's `dask scheduler` / `dask worker` command, its $TLS expanded, with `subst` applied token by token."
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    tls = re.search(r'^TLS="([^"]+)"$', text, re.M)[1]
    [line] = [x for x in text.splitlines() if x.startswith(f"dask {kind} ")]
    toks = [subst.get(t, t) for t in shlex.split(line.replace("$TLS", tls))[2:]]
    if "--nworkers" in toks:
        toks[toks.index("--nworkers") + 1] = "1"                            # one worker process on the shared CI box
    return toks


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listeners(procs) -> set:
    "(ip, port) of every TCP socket listening in the process trees of `procs` (the nanny's worker included)."
    import psutil
    out = set()
    for p in procs:
        root = psutil.Process(p.pid)
        for q in (root, *root.children(recursive=True)):
            out |= {(c.laddr.ip, c.laddr.port) for c in q.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    return out


def _tls_dropped(port: int, ca: str, cert=None) -> bool:
    """True when the TLS listener on 127.0.0.1:`port` drops a client that trusts `ca` and shows `cert` (cert, key) or
    none; False when it answers (Dask's handshake)."""
    ctx = ssl.create_default_context(cafile=ca)
    ctx.check_hostname = False
    if cert:
        ctx.load_cert_chain(*cert)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as raw, ctx.wrap_socket(raw) as t:
            t.sendall(b"\0" * 4)                # half a Dask frame: no certificate -> an alert, else Dask's handshake
            return t.recv(1) == b""
    except (ssl.SSLError, ConnectionError):
        return True


def _http_status(port: int, path: str):
    "The status of a plain-HTTP GET of `path` on 127.0.0.1:`port`, None when what listens there does not answer HTTP."
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, http.client.HTTPException):
        return None


def test_a_sweep_through_a_tls_scheduler_equals_the_in_process_one_and_clients_without_its_certificates_are_refused(
        tmp_path, monkeypatch):
    from distributed import Client
    from distributed.security import Security
    for _, var in DASK_TLS.values():
        monkeypatch.delenv(var, raising=False)
    good, foreign = _pem_files(tmp_path, Security.temporary(), "good"), _pem_files(tmp_path, Security.temporary(), "other")
    c = {"SYN-A (synthetic)": synthetic_candles(n=3000, seed=31), "SYN-B (synthetic)": synthetic_candles(n=3000, seed=32)}
    cfg = parse_grid(["fast=4:16:4", "slow=25:45:10"])
    run = lambda i, sch, **kw: run_sweep(c, "ema_cross", cfg, i, tmp_path / "sw", scheduler=sch,  # noqa: E731
                                         progress=lambda m: None, **SWEEP_KW, **kw)
    ref = _figures(run("inproc", "inprocess"))
    port = _free_port()
    addr = f"tls://127.0.0.1:{port}"
    with pytest.raises(SchedulerRefused, match="missing --tls-ca-file"):
        run("nocert", addr)                                                  # no certificates: refused before a connect
    dask = [os.path.join(os.path.dirname(sys.executable), "dask")]
    subst = {"SCHEDULER": "127.0.0.1", "8786": str(port), "tls://SCHEDULER:8786": addr, "ca.pem": good["ca"],
             "node.pem": good["cert"], "node-key.pem": good["key"], "127.0.0.1:8787": "127.0.0.1:0"}
    sched, worker = _readme_dask("scheduler", subst), _readme_dask("worker", subst)    # the README's commands, run
    assert all(x in sched and x in worker for x in ("--no-dashboard", "--dashboard-address", good["key"]))
    procs = [subprocess.Popen(dask + ["scheduler", *sched], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)]
    try:
        procs.append(subprocess.Popen(dask + ["worker", *worker], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True))
        sec = Security(tls_ca_file=good["ca"], tls_client_cert=good["cert"], tls_client_key=good["key"],
                       require_encryption=True)
        with Client(addr, security=sec, timeout=30) as cl:
            cl.wait_for_workers(1, timeout=60)
        sw = run("remote", addr, tls=good)
        assert sw["computed"] == sw["tasks"] and _figures(sw) == ref          # to the bit, through TLS
        env = {**os.environ, "CRYPTOBOT_STATE_DIR": str(tmp_path), **{var: good[k] for k, (_, var) in DASK_TLS.items()}}
        code = "import sys; from cryptobot.cli import main; sys.exit(main(sys.argv[1:]))"
        p = subprocess.run([sys.executable, "-c", code, "sweep", "--data", "synthetic", "--n-synthetic", "2000", "--grid",
                            "fast=5,10", "--grid", "slow=30", "--folds", "2", "--id", "cli", "--scheduler", addr],
                           capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
        assert p.returncode == 0 and f"on {addr} (1 workers)" in p.stderr, p.stderr   # the CLI, certificates from env
        assert _tls_dropped(port, good["ca"])                                # trusts the scheduler, shows no certificate
        assert not _tls_dropped(port, good["ca"], (good["cert"], good["key"]))   # the control: with the cluster's
        for who, s in (("another CA's certificate", Security(tls_ca_file=foreign["ca"], tls_client_cert=foreign["cert"],
                                                             tls_client_key=foreign["key"], require_encryption=True)),
                       ("the cluster's CA, another certificate", Security(
                           tls_ca_file=good["ca"], tls_client_cert=foreign["cert"], tls_client_key=foreign["key"],
                           require_encryption=True))):
            with pytest.raises((OSError, TimeoutError)):
                Client(addr, security=s, timeout=3).close()
                pytest.fail(f"a client with {who} was let in")
        with pytest.raises((OSError, TimeoutError)):                        # plain TCP to the TLS port
            Client(f"tcp://127.0.0.1:{port}", timeout=3).close()
        with Client(addr, security=sec, timeout=30) as cl:                   # the cluster itself is still fine
            assert len(cl.scheduler_info()["workers"]) == 1
        ls = _listeners(procs)                                               # the README's flags: no dashboard, and
        assert all(_http_status(port, "/status") != 200 for _, port in ls)   # Dask's plain-HTTP /health, /metrics and
        assert any(_http_status(port, "/health") == 200 for _, port in ls)   # /info only on loopback; beyond it TLS only
        beyond = [port for ip, port in ls if not ipaddress.ip_address(ip).is_loopback]
        assert all(_http_status(port, "/health") is None for port in beyond), (ls, beyond)
    finally:
        for p in procs[::-1]:
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs[::-1]:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
