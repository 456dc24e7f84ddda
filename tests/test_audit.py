"""The readiness audit: verdict logic both ways, the checks against real artefacts (a small synthetic model, a replay's
state dir, an empty state dir, planted secrets, a loose .env, a committed .env, a tampered state.json), the approval
gate exercised for real, PSI against a hand-computed value, and the papermill workflow through `audit_main`."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cryptobot import audit as A
from cryptobot.config import Settings

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "binance-usdm_BTCUSDT_1h_2020-09-13_2025-09-11.csv"


def fake_key(seed: int = 1) -> str:
    "A Binance-shaped key built at run time (64 mixed-case letters and digits), so this file holds no key literal."
    import random
    r = random.Random(seed)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    return "Aa1" + "".join(r.choice(alphabet) for _ in range(61))


def settings_for(root: Path, **kw) -> Settings:
    return Settings(state_dir=root / "var", data_dir=root / "data", reports_dir=root / "reports", **kw)


def by_name(checks) -> dict:
    return {c.name: c for c in checks}


# ------------------------------------------------------------------------------------------------ verdict logic
GOOD = [A.Check(d, n, A.PASS, f"{n} measured fine") for n, d in A.CHECK_NAMES.items()]


def test_all_good_evidence_passes():
    result, blockers = A.verdict(GOOD)
    assert (result, blockers) == (A.PASS, [])
    risk, per = A.score(GOOD)
    assert risk == 0.0 and set(per.values()) == {A.PASS}
    md = A.render_markdown(GOOD, date="2026-01-01")
    assert A.parse_verdict(md) == (A.PASS, f"all {len(GOOD)} checks pass (0 warnings); risk score 0/100")


@pytest.mark.parametrize("name", list(A.CHECK_NAMES))
def test_one_failing_check_flips_the_verdict_and_is_named(name):
    checks = [A.Check(c.domain, c.name, A.FAIL, "measured badly", f"{name} is broken") if c.name == name else c
              for c in GOOD]
    result, blockers = A.verdict(checks)
    assert result == A.FAIL and blockers == [f"{A.CHECK_NAMES[name]}/{name}: {name} is broken"]
    md = A.render_markdown(checks, date="2026-01-01")
    word, summary = A.parse_verdict(md)
    assert word == A.FAIL and f"{name}: {name} is broken" in summary
    risk, per = A.score(checks)
    d = A.CHECK_NAMES[name]
    n_in_domain = sum(1 for x in A.CHECK_NAMES.values() if x == d)
    assert per[d] == A.FAIL and risk == round(A.DOMAINS[d][1] / n_in_domain, 1)


def test_warn_does_not_block_and_a_missing_check_does():
    warned = [A.Check(c.domain, c.name, A.WARN, "so-so") if c.name == "feature_psi" else c for c in GOOD]
    assert A.verdict(warned)[0] == A.PASS and A.score(warned)[1]["drift"] == A.WARN
    result, blockers = A.verdict([c for c in GOOD if c.name != "approval_gate"])
    assert result == A.FAIL and blockers == ["execution/approval_gate: the check did not run (no evidence)"]


def test_a_crashing_check_is_a_fail(monkeypatch, tmp_path):
    def boom(ev):
        raise RuntimeError("disk on fire")
    monkeypatch.setitem(A.CHECKS, "rate_limit", boom)
    c = A.run_check("rate_limit", A.Evidence(settings_for(tmp_path)))
    assert c.status == A.FAIL and "disk on fire" in c.evidence


def test_psi_hand_computed():
    # expected 0..99 in 5 bins of 20 %; actual shares 10/30/20/20/20 %:
    # 0.1*ln(0.5) ... = (0.1-0.2) ln(0.1/0.2) + (0.3-0.2) ln(0.3/0.2) = 0.1*0.693147 + 0.1*0.405465 = 0.1098612
    exp = list(range(100))
    act = [5] * 10 + [30] * 30 + [50] * 20 + [70] * 20 + [90] * 20
    assert abs(A.psi(exp, act, bins=5) - 0.10986123) < 1e-7
    assert A.psi(exp, exp, bins=5) == 0.0
    assert A.psi_status(0.05) == A.PASS and A.psi_status(0.10986) == A.WARN and A.psi_status(0.3) == A.FAIL


def test_audit_module_is_lean():
    code = ("import sys, cryptobot.audit as a; heavy = [m for m in ('vectorbt', 'papermill', 'plotly', 'sklearn', "
            "'matplotlib', 'ccxt', 'pandas') if m in sys.modules]; print(heavy); assert not heavy")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_gate_blockers_read_the_latest_verdict(tmp_path):
    s = settings_for(tmp_path)
    assert "no readiness audit" in A.gate_blockers(s)[0]
    now = time.time()
    today = A.utc_date(now)
    A.write_report_md(GOOD, s.reports_dir, date=today)
    assert A.gate_blockers(s, now=now) == []
    bad = [A.Check(c.domain, c.name, A.FAIL, "x", "dotenv is 0644") if c.name == "dotenv_mode" else c for c in GOOD]
    A.write_report_md(bad, s.reports_dir, date=today)
    assert "dotenv is 0644" in A.gate_blockers(s, now=now)[0]
    A.write_report_md(GOOD, s.reports_dir, date=today)
    assert "days old" in A.gate_blockers(s, now=now + 10 * 86400)[0]


# ------------------------------------------------------------------------------------------------ security checks
def test_dotenv_mode_0644_fails_0600_passes(tmp_path):
    env = tmp_path / ".env"
    env.write_text("BINANCE_API_KEY=\n")
    env.chmod(0o644)
    c = A.run_check("dotenv_mode", A.Evidence(settings_for(tmp_path), env_files=[env]))
    assert c.status == A.FAIL and "0644" in c.evidence and "chmod 600" in c.detail
    env.chmod(0o600)
    assert A.run_check("dotenv_mode", A.Evidence(settings_for(tmp_path), env_files=[env])).status == A.PASS


def test_key_planted_in_a_report_fails_and_is_not_shown(tmp_path):
    s = settings_for(tmp_path)
    s.reports_dir.mkdir(parents=True)
    (s.reports_dir / "backtest-x.html").write_text("<html>plotly " + "x9+/" * 500 + "</html>")
    assert A.run_check("secrets_in_outputs", A.Evidence(s)).status == A.PASS
    key = fake_key()
    (s.reports_dir / "train-x.md").write_text(f"debug: headers X-MBX-APIKEY: {key}\n")
    c = A.run_check("secrets_in_outputs", A.Evidence(s))
    assert c.status == A.FAIL and "train-x.md" in c.detail and "key-like" in c.detail
    assert key not in c.evidence + c.detail


def test_configured_secret_in_the_journal_fails(tmp_path):
    from cryptobot.journal import Journal
    secret = "not-a-real-secret-" + "7" * 10
    s = settings_for(tmp_path, api_key="some-key-123456", api_secret=secret)
    with Journal(s.state_dir / "journal.sqlite") as j:
        j.record_poll_error(f"signed request failed: secret={secret}")
    c = A.run_check("secrets_in_outputs", A.Evidence(s))
    assert c.status == A.FAIL and "configured BINANCE_API_SECRET" in c.detail and secret not in c.evidence + c.detail


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t"})


def test_repo_scan_and_dotenv_history(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / ".gitignore").write_text(".env\n")
    (repo / "code.py").write_text("import os\nKEY = os.environ['BINANCE_API_KEY']\n")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "clean")
    s = settings_for(tmp_path)
    ev = lambda: A.Evidence(s, repo_dir=repo)
    assert A.run_check("keys_in_repo", ev()).status == A.PASS
    assert A.run_check("dotenv_git", ev()).status == A.PASS
    (repo / "config.py").write_text(f"api_key = '{fake_key(2)}'\n")
    _git(repo, "add", "config.py")
    c = A.run_check("keys_in_repo", ev())
    assert c.status == A.FAIL and "config.py" in c.detail
    (repo / ".env").write_text("BINANCE_API_KEY=x\n")
    _git(repo, "add", "-f", ".env")
    _git(repo, "commit", "-qm", "oops")
    _git(repo, "rm", "-q", "--cached", ".env")
    _git(repo, "commit", "-qm", "remove it again")
    c = A.run_check("dotenv_git", ev())
    assert c.status == A.FAIL and "in the git history" in c.detail and "2 commits" in c.evidence
    (repo / ".gitignore").write_text("")
    c = A.run_check("dotenv_git", ev())
    assert "not git-ignored" in c.detail


def test_unit_without_restart_always_fails(tmp_path):
    unit = tmp_path / "cryptobot.service"
    unit.write_text((ROOT / "deployment" / "cryptobot.service").read_text().replace("Restart=always", "Restart=on-failure"))
    s = settings_for(tmp_path)
    assert A.run_check("restart_always", A.Evidence(s, unit_path=ROOT / "deployment" / "cryptobot.service")).status == A.PASS
    c = A.run_check("restart_always", A.Evidence(s, unit_path=unit))
    assert c.status == A.FAIL and "Restart=on-failure" in c.evidence


# ------------------------------------------------------------------------------------------------ exercised gates
def test_forged_approvals_are_refused_by_the_real_guardian():
    ok, steps = A.exercise_approval_gate(Settings())
    text = "; ".join(steps)
    assert ok, text
    for what in ("forged Approval(...) construction: refused", "duck-typed impostor: refused",
                 "amount x10: refused", "another Guardian: refused", "genuine approval: accepted once",
                 "replay of the redeemed approval: refused"):
        assert what in text


def test_approval_gate_check_fails_when_the_guardian_accepts_anything(monkeypatch):
    from cryptobot import guardian as G
    real = G.Guardian.redeem
    monkeypatch.setattr(G.Guardian, "redeem", lambda self, a: a.plan if hasattr(a, "plan") else real(self, a))
    ok, steps = A.exercise_approval_gate(Settings())
    assert not ok and any("ACCEPTED" in s for s in steps)
    assert A.run_check("approval_gate", A.Evidence(Settings())).status == A.FAIL


def test_lock_persistence_is_read_back_from_disk():
    ok, txt = A.exercise_lock_persistence(Settings(kill_switch_losses=2))
    assert ok and "state.json read back: locked=True" in txt and "2 losing trades" in txt


def test_the_audit_reads_guardian_state_typed(tmp_path):
    "The audit reads state.json through guardian.load_state (a GuardianState), never as a hand-indexed dict."
    from cryptobot.guardian import Guardian, GuardianState
    from cryptobot.journal import ClosedTrade, Journal
    s = settings_for(tmp_path, kill_switch_losses=1)
    t0 = time.time() - 7200
    with Journal(s.state_dir / "journal.sqlite") as j:
        Guardian(s, s.state_dir, j).record_trade(ClosedTrade(trade_key="t1", symbol=s.symbol, entry_time=t0,
                                                             exit_time=t0 + 60, entry_price=100.0, exit_price=99.0,
                                                             amount=1.0, fees=0.2, pnl=-1.2, exit_reason="stop"))
    with A.Evidence(s) as ev:
        st, err = ev.state()
        assert isinstance(st, GuardianState) and err is None and st.locked and st.consecutive_losses == 1
        c = A.run_check("state_matches_journal", ev)
    assert c.status == A.PASS and "loss streak 1/1" in c.evidence and "locked True/True" in c.evidence, c
    src = Path(A.__file__).read_text()
    assert '["lock"]' not in src and "read_state" not in src


# ------------------------------------------------------------------------------------------------ journal evidence
def test_entry_without_approval_and_position_without_stop_fail(tmp_path):
    from cryptobot.journal import Journal
    s = settings_for(tmp_path)
    with Journal(s.state_dir / "journal.sqlite") as j:
        j.record_intent("cbe-rogue", s.symbol, "buy", "market", 0.01, purpose="entry", candle_time=time.time())
        j.record_order_status("cbe-rogue", "closed", exchange_id="1", filled=0.01, average=50_000.0)
    c = A.run_check("orders_approved", A.Evidence(s))
    assert c.status == A.FAIL and "cbe-rogue" in c.detail
    c = A.run_check("stops_on_exchange", A.Evidence(s))
    assert c.status == A.FAIL and "cbe-rogue" in c.detail and "journal evidence only" in c.evidence


def test_candle_age_fresh_passes_stale_fails(tmp_path):
    from cryptobot.guardian import Guardian
    from cryptobot.journal import Journal
    s = settings_for(tmp_path)
    now = time.time()
    with Journal(s.state_dir / "journal.sqlite") as j:
        Guardian(s, s.state_dir, j).note_candle(now - 120, 10_000.0)
    assert A.run_check("candle_age", A.Evidence(s, now=now)).status == A.PASS
    assert A.run_check("state_valid", A.Evidence(s, now=now)).status == A.PASS
    assert A.run_check("candle_age", A.Evidence(s, now=now + 3 * 3600)).status == A.FAIL


def test_risk_settings_looser_fail_tighter_warn(tmp_path):
    assert A.run_check("risk_limits", A.Evidence(settings_for(tmp_path))).status == A.PASS
    assert A.run_check("risk_limits", A.Evidence(settings_for(tmp_path, stop_loss_pct=3.0))).status == A.FAIL
    assert A.run_check("risk_limits", A.Evidence(settings_for(tmp_path, leverage=0.5))).status == A.WARN


def test_backtest_threshold_both_ways(tmp_path):
    "The after-cost rule on given backtest stats (the real backtest runs in the demo test below)."
    class R:
        def __init__(self, ret, n):
            self.stats = dict(start="2025-01-01", end="2025-06-01", fee=0.001, slippage=0.0005, total_return=ret,
                              max_drawdown=-0.05, sharpe=1.0, trades=n, win_rate=0.5, fees_paid=10.0,
                              buy_and_hold_return=0.1)

    class Art:
        manifest = {"data": {"source": "real:x"}}

    for ret, n, want in ((0.12, 80, A.PASS), (-0.01, 80, A.FAIL), (0.0, 80, A.FAIL), (0.05, 10, A.WARN)):
        ev = A.Evidence(settings_for(tmp_path))
        ev._cache.update(oos_backtest=(R(ret, n), None), artifact=(Art(), None))
        assert A.run_check("oos_backtest", ev).status == want, (ret, n)
    ev = A.Evidence(settings_for(tmp_path))            # a flat cost-aware policy: says it does not trade
    ev._cache.update(oos_backtest=(R(0.0, 0), None), artifact=(Art(), None))
    c = A.run_check("oos_backtest", ev)
    assert c.status == A.FAIL and "does not trade" in c.detail and "loses money" not in c.detail, c


# ------------------------------------------------------------------------------------------------ demo artefacts
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    "What `make demo` leaves: a small model trained on the SYNTHETIC market and a paper replay's state dir."
    from cryptobot import data as D, features as F, model as M
    from cryptobot.parity import replay
    root = tmp_path_factory.mktemp("demo")
    spec = M.data_spec("synthetic", n_synthetic=3000)
    c = M.candles_from_spec(spec)
    D.save_candles(c, D.raw_path(root / "data", "BTC/USDT", "1h", exchange="synthetic"))
    res = M.train_walk_forward(c, F.build_features(c), data_spec=spec, n_folds=2, params={"max_iter": 30})
    # the checks below need trades; a synthetic market's cost-aware policy may well be flat (trade: false), so the
    # artifact is told to trade thresholds that do (the runner and the audit's backtest both read manifest strategy)
    res.manifest["policy"] = {**res.manifest["policy"], "trade": True, "entry_threshold": 0.55, "exit_threshold": 0.45}
    res.manifest["strategy"] = M.policy_thresholds(res.manifest["policy"]).to_dict()
    art = res.save(root / "data" / "models")
    r = replay(c, M.load_artifact(art), n_candles=200, fills="exchange", state_dir=root / "var")
    return dict(root=root, artifact=art, replay=r)


def test_demo_artefacts_fail_with_synthetic_and_paper_only_blockers(demo):
    s = settings_for(demo["root"])
    t0 = time.perf_counter()
    checks = by_name(A.run_checks(s, repo_dir=ROOT))
    print(f"run_checks on the demo artefacts: {time.perf_counter() - t0:.1f} s")
    for c in checks.values():
        print(f"{c.status:4} {c.domain}/{c.name}: {c.evidence[:140]} -> {c.detail[:100]}")
    result, blockers = A.verdict(list(checks.values()))
    assert result == A.FAIL
    text = "\n".join(blockers)
    assert "strategy/training_data" in text and "SYNTHETIC" in text
    assert "test_phase/testnet_round_trip" in text and "paper-only history" in text
    assert "test_phase/paper_trades" in text                        # 200 candles: far from 14 days / 20 trades
    # what the replay did right is recognised too
    n = len(demo["replay"].trades)
    assert checks["orders_approved"].status == A.PASS and f"{n} entry intents, {n} with" in checks["orders_approved"].evidence
    assert checks["state_matches_journal"].status == A.PASS
    assert checks["approval_gate"].status == A.PASS and checks["lock_persists"].status == A.PASS
    assert checks["paper_vs_backtest"].status == A.PASS, checks["paper_vs_backtest"].evidence
    assert checks["model_fingerprint"].status == A.PASS and checks["logging"].status == A.PASS
    assert checks["feature_psi"].status == A.WARN and "inside the training span" in checks["feature_psi"].detail


def test_tampered_state_json_fails(demo, tmp_path):
    import shutil
    root = tmp_path / "copy"
    shutil.copytree(demo["root"] / "var", root / "var")
    st = json.loads((root / "var" / "state.json").read_text())
    st["pnl"]["total"] += 50.0
    st["consecutive_losses"] = 0 if st["consecutive_losses"] else 1
    (root / "var" / "state.json").write_text(json.dumps(st))
    c = A.run_check("state_matches_journal", A.Evidence(settings_for(root)))
    assert c.status == A.FAIL and "pnl.total" in c.detail and "loss streak" in c.detail


def test_empty_state_dir_fails_honestly(demo, tmp_path):
    s = settings_for(tmp_path)
    checks = by_name(A.run_checks(s, model=demo["artifact"], repo_dir=ROOT, backtest=False))
    result, blockers = A.verdict(list(checks.values()))
    assert result == A.FAIL
    for name in ("candle_age", "state_valid", "paper_trades", "testnet_round_trip", "training_data", "logging"):
        assert checks[name].status == A.FAIL, name
    assert checks["oos_backtest"].status == A.WARN                    # skipped, said so


def test_audit_main_runs_the_workflow_and_writes_both_files(demo, capsys):
    s = settings_for(demo["root"])
    date = "2026-11-24"
    t0 = time.perf_counter()
    rc = A.audit_main(s, model="latest", repo_dir=ROOT, date=date)
    print(f"audit_main (papermill): {time.perf_counter() - t0:.1f} s")
    out = capsys.readouterr().out
    md, html, js = A.report_paths(s.reports_dir, date)
    assert rc == 1 and out.startswith("Verdict: FAIL — ") and str(html) in out
    assert md.exists() and html.exists() and js.exists()
    word, summary = A.parse_verdict(md.read_text())
    assert word == A.FAIL and "training_data" in summary and "testnet_round_trip" in summary
    assert json.loads(js.read_text())["verdict"] == A.FAIL
    page = html.read_text()
    assert "Verdict: FAIL" in page and "Go-live steps" in page and "systemctl enable --now cryptobot" in page
    assert A.latest_verdict(s.reports_dir).verdict == A.FAIL


def test_audit_main_fails_closed_when_the_workflow_breaks(tmp_path, monkeypatch, capsys):
    from cryptobot import reports
    s = settings_for(tmp_path)
    date = A.utc_date()
    A.write_report_md(GOOD, s.reports_dir, date=date)                   # an earlier PASS today …
    def broken(*a, **k):
        raise reports.WorkflowError("audit workflow failed in cell 3: KeyError")
    monkeypatch.setattr(A, "run_workflow", broken)                      # the audit's own (top-level) import
    assert A.audit_main(s, date=date) == 1
    assert A.latest_verdict(s.reports_dir).verdict == A.FAIL              # … can never open the gate afterwards
    assert "did not complete" in capsys.readouterr().out


@pytest.mark.skipif(not REAL.exists(), reason=f"real data file {REAL} absent (../shared/data)")
def test_real_data_model_passes_training_data_but_is_stale(tmp_path):
    from cryptobot import data as D, model as M
    spec = M.data_spec(str(REAL), start="2024-06-01")
    c = M.candles_from_spec(spec)
    res = M.train_walk_forward(c, data_spec=spec, n_folds=2, params={"max_iter": 30})
    art = res.save(tmp_path / "models")
    ev = A.Evidence(settings_for(tmp_path), model=art)
    c1, c2 = A.run_check("training_data", ev), A.run_check("model_freshness", ev)
    assert c1.status == A.PASS and "real:" in c1.evidence
    assert c2.status == A.FAIL and "stale" in c2.detail                # the file ends 2025-09


def test_candles_given_as_a_path_are_a_source(tmp_path):
    "Regression: a candle file path (a str, which has .index too) must be loaded, not mistaken for a frame."
    from cryptobot.config import Settings
    from cryptobot.data import save_candles, synthetic_candles
    path = save_candles(synthetic_candles(800, seed=1), tmp_path / "c.parquet")
    ev = A.Evidence(Settings(state_dir=tmp_path / "st", data_dir=tmp_path / "d"), candles=str(path))
    sources = ev.candle_sources()
    assert [len(df) for label, df in sources if label.startswith("given candles")] == [800]


@pytest.mark.parametrize("damage", ["none", "journal_deleted", "streak_lowered_by_hand"])
def test_state_valid_reports_the_runners_entry_gate(tmp_path, damage):
    "The audit's state_valid check asks the same entry gate as the runner: it cannot PASS a state the runner refuses."
    from cryptobot.guardian import Guardian, entry_gate
    from cryptobot.journal import ClosedTrade, Journal
    s = settings_for(tmp_path)
    now, t0 = time.time(), time.time() - 7200
    with Journal(s.state_dir / "journal.sqlite") as j:
        g = Guardian(s, s.state_dir, j)
        for i in range(2):
            g.record_trade(ClosedTrade(f"t{i}", "BTC/USDT", t0 + i, t0 + 60 + i, 100.0, 98.0, 1.0, 0.2, -2.2, "stop"))
        g.note_candle(now - 60, 10_000.0)
    if damage == "journal_deleted":
        for p in s.state_dir.glob("journal.sqlite*"):
            p.unlink()
    elif damage == "streak_lowered_by_hand":
        st = json.loads((s.state_dir / "state.json").read_text())
        st["consecutive_losses"] = 0
        (s.state_dir / "state.json").write_text(json.dumps(st))
    c = A.run_check("state_valid", A.Evidence(s, now=now))
    gate = entry_gate(s.state_dir, now=now)
    if damage == "none":
        assert gate and c.status == A.PASS and "entries allowed" in c.evidence, c
        return
    assert not gate and c.status in (A.WARN, A.FAIL) and "entries REFUSED: " + "; ".join(gate.reasons) in c.evidence, c
    assert c.status == (A.FAIL if damage == "journal_deleted" else A.WARN)
    if damage == "streak_lowered_by_hand":
        with Journal(s.state_dir / "journal.sqlite") as j:                    # the runner agrees
            assert Guardian(s, s.state_dir, j).current_state.lock_reason == gate.reasons[0]


def test_paper_run_locked_by_the_kill_switch_matches_a_backtest_with_the_same_kill_switch(demo, tmp_path):
    """A paper run that locks after its first loss stops entering; the backtest of the same bars with the same kill
    switch stops too, so the two trade lists agree, and nothing after the lock is called unexplained."""
    from cryptobot import data as D, model as M
    from cryptobot.journal import Journal
    from cryptobot.parity import replay
    root = tmp_path / "locked"
    c = D.load_candles(D.raw_path(demo["root"] / "data", "BTC/USDT", "1h", exchange="synthetic"))
    s = settings_for(root, kill_switch_losses=1)
    D.save_candles(c, D.raw_path(root / "data", "BTC/USDT", "1h", exchange="synthetic"))
    r = replay(c, M.load_artifact(demo["artifact"]), n_candles=200, fills="exchange", state_dir=root / "var", settings=s)
    with Journal(root / "var" / "journal.sqlite", readonly=True) as j:
        locks = j.select("SELECT ts, message FROM events WHERE kind = 'lock'")
    assert locks and "kill switch" in locks[0]["message"], locks            # the paper run did lock …
    n_demo = len(demo["replay"].trades)
    assert len(r.trades) < n_demo, (len(r.trades), n_demo)                   # … and entered less than without the lock
    ev = A.Evidence(s, model=demo["artifact"], env_files=[], ask_exchange=False)
    cmp, why = A.compare_paper_backtest(ev)
    assert cmp is not None, why
    assert cmp["n_backtest"] == cmp["n_live"] == len(r.trades), cmp
    assert cmp["unexplained"] == [], cmp["unexplained"]
    chk = A.check_paper_vs_backtest(ev)
    assert chk.status == A.PASS, chk
    ev.close()


def test_divergences_after_a_kill_switch_lock_are_explained_as_kill_switch():
    """The classification itself: a trade the backtest took after the paper run locked (or one the paper run took
    after a human unlocked it) is a kill-switch divergence; one before the lock, or an exit mismatch, stays as it was."""
    import pandas as pd
    t = lambda h: str(pd.Timestamp("2026-01-01", tz="UTC") + pd.Timedelta(hours=h))
    divs = [{"trade": 0, "entry": t(1), "what": "missing in live", "explained": None},
            {"trade": 3, "entry": t(9), "what": "missing in live", "explained": None},
            {"trade": None, "entry": t(12), "what": "only in live", "explained": None},
            {"trade": 4, "entry": t(10), "what": "live exit x vs backtest y", "explained": None}]
    lock_ts = pd.Timestamp(t(5)).timestamp()
    out = A.explain_lock_divergences(divs, [(lock_ts, "kill switch: 1 consecutive losing trades (limit 1)")])
    assert [d["explained"] for d in out] == [None, "kill_switch", "kill_switch", None]
    assert A.explain_lock_divergences(divs, []) == divs                      # no lock: nothing explained
    assert [d["explained"] for d in A.explain_lock_divergences(divs, [(lock_ts, "daily loss limit")])] == [None] * 4


# ------------------------------------------------------------------------------------------------ the account behind the stops
# The audit asks the exchange (the emulator on 127.0.0.1 through the real ccxt client) for every configured symbol's
# balance and open orders before it says a stop is in place or that no position can be open.
AKEY, ASECRET = "audit-key-7f31", "audit-secret-Qm22x"
SYMS3 = ("BTC/USDT", "ETH/USDT", "SOL/USDT")


def _emulator(symbols, balances):
    from cryptobot.data import synthetic_candles
    from cryptobot.emulator import Emulator
    candles = {sym: synthetic_candles(n=900, seed=5 + k, start_price=10_000.0 / (1, 20, 100)[k])
               for k, sym in enumerate(symbols)}
    emu = Emulator(candles, timeframe="1h", balances=balances, api_key=AKEY, api_secret=ASECRET, clock="stepped",
                   start=640)
    emu.start()
    return emu


def _stops_check(s, **kw):
    with A.Evidence(s, backtest=False, env_files=[], **kw) as ev:
        return A.run_check("stops_on_exchange", ev)


@pytest.mark.parametrize("symbols,coin", [(("BTC/USDT",), "BTC"), (SYMS3, "ETH")])
@pytest.mark.parametrize("journal", ["deleted", "flat"])
def test_coin_on_the_exchange_without_a_journaled_position_fails_naming_the_symbol(tmp_path, symbols, coin, journal):
    """The journal is gone (or replaced by an empty one) while the account holds coin: an unknown position, FAIL naming
    its symbol (CRYPTOBOT_SYMBOLS or one symbol alike) — never "no position can be open"."""
    from cryptobot.journal import Journal
    emu = _emulator(symbols, {"USDT": 1_000, coin: 0.17922})
    try:
        s = settings_for(tmp_path, exchange_url=emu.base_url, api_key=AKEY, api_secret=ASECRET, symbols=symbols)
        if journal == "flat":
            s.state_dir.mkdir(parents=True)
            Journal(s.state_dir / "journal.sqlite").close()
        c = _stops_check(s)
        sym = f"{coin}/USDT"
        assert c.status == A.FAIL, c
        assert c.detail.startswith(f"{sym}: the exchange holds 0.17922 {coin} and the journal no open position"), c
        assert all(f"{o}:" not in c.detail for o in symbols if o != sym), c
        assert "asked the exchange" in c.evidence, c
    finally:
        emu.stop()


def test_without_access_the_stop_check_warns_never_passes(tmp_path):
    "No keys, no emulator URL, no paper book: no journal, a flat journal, a journaled position with its stop: WARN."
    from cryptobot.journal import Journal
    s = settings_for(tmp_path)
    c = _stops_check(s)
    assert c.status == A.WARN and "no journal" in c.evidence and "the exchange was not asked" in c.detail, c
    s.state_dir.mkdir(parents=True)
    with Journal(s.state_dir / "journal.sqlite") as j:
        c = _stops_check(s)
        assert c.status == A.WARN and "0 open position(s)" in c.evidence, c
        j.record_intent("cbe-1", s.symbol, "buy", "market", 0.01, purpose="entry", candle_time=time.time() - 3600)
        j.record_order_status("cbe-1", "closed", exchange_id="1", filled=0.01, average=50_000.0)
        j.record_intent("cbs-1", s.symbol, "sell", "stop_loss_limit", 0.01, price=49_000.0, stop_price=49_250.0,
                        purpose="stop", candle_time=time.time() - 3600)
        j.record_order_status("cbs-1", "open", exchange_id="2")
    c = _stops_check(s)
    assert c.status == A.WARN and "cbs-1" in c.evidence and "journal evidence only" in c.evidence, c
    c = _stops_check(dataclasses.replace(s, exchange_url="http://127.0.0.1:9", api_key=None, api_secret=None))
    assert c.status == A.WARN and "asking the exchange (http://127.0.0.1:9) failed" in c.evidence, c   # unreachable


@pytest.fixture
def protected(tmp_path):
    "A runner (the real one, paper mode against the emulator) that entered BTC and placed its stop; then stopped."
    from cryptobot.live import start_runner
    from cryptobot.strategy import make_strategy, save_strategy_artifact
    emu = _emulator(("BTC/USDT",), {"USDT": 10_000})
    strat = make_strategy("ema_cross", {"fast": 3, "slow": 8})
    s = settings_for(tmp_path, exchange_url=emu.base_url, api_key=AKEY, api_secret=ASECRET)
    art = save_strategy_artifact(strat, tmp_path / "art", symbol="BTC/USDT", timeframe="1h").parent
    try:
        r = start_runner(s, "paper", art, strategy=strat, settle_s=0.0, poll_s=0.02, min_poll_s=0.01,
                         executor_kw={"settle_s": 0.0, "sleep": lambda _s: None},
                         retry={"retries": 2, "base_delay": 0.05, "max_delay": 0.2}, rate_limit_ms=1.0)
        try:
            for k in range(200):
                if k:
                    emu.advance(1)
                r.step()
                r.queue.drain(60)
                pos = r.executor.position()
                if pos is not None and pos.stop_cid:
                    break
            assert pos is not None and pos.stop_cid, "no protected position in 200 candles"
        finally:
            r.close()
            r.journal.close()
        yield emu, s, pos
    finally:
        emu.stop()


def _client(emu):
    from cryptobot.client import make_client
    c = make_client(api_key=AKEY, api_secret=ASECRET, base_url=emu.base_url)
    c.load_markets()
    return c


def test_a_protected_position_passes_with_the_accounts_balance_and_stop(protected):
    emu, s, pos = protected
    c = _stops_check(s)
    assert c.status == A.PASS, (c.detail, c.evidence)
    held = float(_client(emu).fetch_balance()["BTC"]["total"])
    assert f"the exchange holds {held:g} BTC" in c.evidence and f"stop {pos.stop_cid}" in c.evidence, c
    assert "on the exchange: sell" in c.evidence and "asked the exchange" in c.evidence, c


@pytest.mark.parametrize("what", ["smaller_stop", "buy_order", "journal_deleted"])
def test_the_account_against_the_stop_fails_naming_the_symbol(protected, what):
    """The stop's quantity is half the position (same client id), the client id now names a buy, or the journal is
    deleted while the position and its stop stand: each a FAIL naming BTC/USDT."""
    emu, s, pos = protected
    cl = _client(emu)
    (st,) = [o for o in cl.fetch_open_orders("BTC/USDT") if o["clientOrderId"] == pos.stop_cid]
    if what == "journal_deleted":
        for f in s.state_dir.iterdir():
            if f.name.startswith(("journal.sqlite", "state.json")):
                f.unlink()
    else:
        cl.cancel_order(st["id"], "BTC/USDT")
        if what == "smaller_stop":
            half = float(cl.amount_to_precision("BTC/USDT", st["amount"] / 2))
            cl.create_order("BTC/USDT", "limit", "sell", half, st["price"],
                            {"stopLossPrice": st["triggerPrice"], "clientOrderId": pos.stop_cid})
        else:
            cl.create_order("BTC/USDT", "limit", "buy", st["amount"], round(st["price"] * 0.5, 2),
                            {"clientOrderId": pos.stop_cid})
    c = _stops_check(s)
    assert c.status == A.FAIL and c.detail.startswith("BTC/USDT: "), c
    expect = {"smaller_stop": "BTC unprotected", "buy_order": f"order {pos.stop_cid} on the exchange is not a sell stop",
              "journal_deleted": "and the journal no open position"}[what]
    assert expect in c.detail, c


@pytest.mark.parametrize("what", ["stop_price", "limit_price", "type"])
def test_a_stop_that_is_not_the_planned_one_fails_the_audit(protected, what):
    """A stop under the bot's client id at the full quantity but another stop price (101), a limit far below the
    plan, or a plain limit sell where a stop-limit was planned: the audit compares it with the
    journal's plan as the stop watch does (`exchange.stop_differences`) and FAILs naming the field."""
    emu, s, pos = protected
    cl = _client(emu)
    (st,) = [o for o in cl.fetch_open_orders("BTC/USDT") if o["clientOrderId"] == pos.stop_cid]
    raw_type = str(st["info"].get("type"))
    cl.cancel_order(st["id"], "BTC/USDT")
    trig = float(st["triggerPrice"])
    assert raw_type == "STOP_LOSS_LIMIT", raw_type     # the emulator's market lists stop-limits only
    if what == "stop_price":
        cl.create_order("BTC/USDT", "limit", "sell", st["amount"], 100.0, {"stopLossPrice": 101.0,
                                                                         "clientOrderId": pos.stop_cid})
    elif what == "limit_price":
        cl.create_order("BTC/USDT", "limit", "sell", st["amount"], round(trig * 0.5, 2),
                        {"stopLossPrice": trig, "clientOrderId": pos.stop_cid})
    else:                                              # a plain limit sell where a stop was planned
        cl.create_order("BTC/USDT", "limit", "sell", st["amount"], round(trig * 1.5, 2), {"clientOrderId": pos.stop_cid})
    c = _stops_check(s)
    assert c.status == A.FAIL and "is not the stop the journal planned" in c.detail, c
    assert c.detail.startswith("BTC/USDT: "), c
    field = {"stop_price": "stopPrice 101", "limit_price": "price", "type": "type"}[what]
    assert field in c.detail, c
