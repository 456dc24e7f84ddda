"""The papermill workflows nbs/workflows/train.ipynb and backtest.ipynb, end to end on a small synthetic market."""
import json
import os
from pathlib import Path

import pytest

pm = pytest.importorskip("papermill")
nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]
WF = ROOT / "nbs" / "workflows"
N = 3000


def _run(name, out, **params):
    pm.execute_notebook(str(WF / f"{name}.ipynb"), str(out), parameters=params, kernel_name="python3",
                        cwd=str(WF), progress_bar=False)
    return nbformat.read(out, as_version=4)


def _text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            parts.append(o.get("text", ""))
            for k, v in (o.get("data") or {}).items():
                if k in ("text/plain", "text/markdown", "text/html"):
                    parts.append(v if isinstance(v, str) else "".join(v))
    return "\n".join(parts)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wf")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    models = tmp / "models"
    nb = _run("train", tmp / "train.ipynb", data="synthetic", n_synthetic=N, n_folds=3, params={"max_iter": 50},
              models_dir=str(models), out_json=str(tmp / "train.json"))
    return tmp, models, nb, json.loads((tmp / "train.json").read_text())


def test_train_workflow_writes_a_loadable_artifact(trained):
    from cryptobot.model import load_artifact
    tmp, models, nb, out = trained
    art = load_artifact(out["artifact"])
    assert Path(out["artifact"]).parent == models and out["model_id"] == art.model_id
    assert out["synthetic"] is True and art.manifest["data"]["source"] == "synthetic"
    assert art.manifest["data"]["spec"] == {"data": "synthetic", "timeframe": "1h", "start": None, "end": None,
                                            "n_synthetic": N, "seed": 7}
    assert len(art.manifest["metrics"]["folds"]) == 3 and 0 <= out["metrics"]["auc"] <= 1
    text = _text(nb)
    assert "SYNTHETIC DATA" in text and "model artifact:" in text
    # plotly figures are in the output, and plotly.js is embedded (self-contained HTML), not fetched from a CDN
    html = [v for c in nb.cells for o in c.get("outputs", []) for k, v in (o.get("data") or {}).items()
            if k == "text/html"]
    assert any("Plotly.newPlot" in h for h in html)
    assert not any('src="https://cdn.plot.ly' in h for h in html)


def test_backtest_workflow_on_the_trained_model(trained):
    tmp, models, _, t = trained
    nb = _run("backtest", tmp / "backtest.ipynb", model="latest", models_dir=str(models), data="synthetic",
              n_synthetic=N, symbol="BTC/USDT", timeframe="1h", out_json=str(tmp / "backtest.json"))
    b = json.loads((tmp / "backtest.json").read_text())
    assert b["model_id"] == t["model_id"] and b["synthetic"] is True
    s = b["stats_full"]
    assert s["trades"] == b["stats"]["trades"] and s["initial_cash"] == 10_000.0
    assert s["start"] > "2020-01-01" and s["bars"] < N            # only the out-of-sample span is backtested
    text = _text(nb)
    assert "SYNTHETIC DATA" in text and "vectorbt agrees with the simulation trade for trade" in text
    # the model trades the manifest's cost-aware policy; beside it the walk-forward policy, the old fixed thresholds,
    # the Guardian (kill switch) and a rule strategy
    from cryptobot.backtest import run_backtest
    from cryptobot.model import candles_from_spec, load_artifact, policy_thresholds
    art = load_artifact(t["artifact"])
    assert art.strategy == policy_thresholds(art.manifest["policy"])
    assert b["cost_aware_policy"]["manifest_policy"] == art.manifest["policy"]
    c = candles_from_spec(art.manifest["data"]["spec"])
    assert s["trades"] == run_backtest(c, art.oos["proba"], art.strategy, vectorbt=False).stats["trades"]
    assert b["cost_aware_policy"]["old_fixed"]["trades"] > 0 and b["rule_strategy"]["trades"] > 0
    assert "old fixed 0.55/0.45" in text and "model + kill switch" in text and "folds flat" in text


def test_backtest_refuses_candles_the_model_was_not_trained_on(trained):
    tmp, models, _, _ = trained
    with pytest.raises(pm.PapermillExecutionError, match="not the ones model"):
        _run("backtest", tmp / "bad.ipynb", model="latest", models_dir=str(models), data="synthetic",
             n_synthetic=N - 500)


def test_train_workflow_reports_the_cost_aware_policy(trained):
    "The chosen policy, the per-fold table with flat folds, the OOS after-cost result beside buy-and-hold and flat."
    from cryptobot.model import candles_from_spec, load_artifact, policy_backtest, trained_policy
    tmp, models, nb, out = trained
    art = load_artifact(out["artifact"])
    pol = art.manifest["policy"]
    assert out["policy"] == pol
    c = candles_from_spec(art.manifest["data"]["spec"])
    _, tab, pol_oos = trained_policy(c, art.oos, art.manifest["label"]["horizon"], pol["max_hold"])
    walk = policy_backtest(c, pol_oos, max_hold=pol["max_hold"])
    o = out["oos_after_cost"]
    assert o["trades"] == walk.stats["trades"] and o["total_return"] == pytest.approx(walk.stats["total_return"])
    assert o["buy_and_hold_return"] == pytest.approx(walk.stats["buy_and_hold_return"]) and o["flat_return"] == 0.0
    text = _text(nb)
    assert "live policy:" in text and f"flat folds: {pol['flat_folds']} of {len(tab)}" in text
    assert "no earlier out-of-sample evidence" in text and "buy-and-hold" in text
    html = [v for c in nb.cells for o in c.get("outputs", []) for k, v in (o.get("data") or {}).items()
            if k == "text/html"]
    assert any("calibrated on earlier folds" in h for h in html)             # the reliability plot
