"""cryptobot.model: labels, walk-forward purge/embargo, metrics, the artifact and its checks."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryptobot import model as M, risk as R
from cryptobot.model import (ModelError, ThresholdPolicy, latest_model, load_artifact, make_labels, train_walk_forward,
                             walk_forward_folds)

SPEC = {"feature_names": ["a", "b", "c"], "lookback": 20, "fingerprint": "test-spec"}


def random_market(n=2500, seed=0, drift=0.0, vol=0.01):
    rng = np.random.default_rng(seed)
    idx = pd.date_range("2022-01-01", periods=n, freq="h", tz="UTC", name="timestamp")
    close = 100 * np.exp(np.cumsum(rng.normal(drift, vol, n)))
    open_ = np.r_[100.0, close[:-1]]
    hi = np.maximum(open_, close) * (1 + np.abs(rng.normal(0, 0.002, n)))
    lo = np.minimum(open_, close) * (1 - np.abs(rng.normal(0, 0.002, n)))
    c = pd.DataFrame({"open": open_, "high": hi, "low": lo, "close": close, "volume": rng.uniform(1, 2, n)},
                     index=idx)
    c.attrs["source"] = "synthetic"
    f = pd.DataFrame(rng.normal(size=(n, 3)), index=idx, columns=["a", "b", "c"])
    f.iloc[:20] = np.nan
    return c, f


# --- labels ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("horizon", [1, 5, 24])
def test_labels_match_a_brute_force_loop(horizon):
    c, _ = random_market(300, seed=horizon)
    cost = M.round_trip_cost(0.001, 0.0005, margin=0.001)
    y = make_labels(c, horizon=horizon, cost=cost)
    close = c["close"].tolist()
    for t in range(len(c)):
        if t + horizon >= len(c):
            assert math.isnan(y.iloc[t])
        else:
            assert y.iloc[t] == float(close[t + horizon] / close[t] - 1 > cost)
    assert y.isna().sum() == horizon and y.index.equals(c.index)


def test_label_defaults_are_the_contract_costs():
    assert R.FEE == 0.001 and R.SLIPPAGE == 0.0005
    assert M.round_trip_cost() == pytest.approx(2 * (0.001 + 0.0005))
    c, _ = random_market(200)
    assert make_labels(c, 3).equals(make_labels(c, 3, cost=0.003))


def test_bad_horizon_is_one_line_error():
    c, _ = random_market(50)
    with pytest.raises(ModelError, match="horizon") as e:
        make_labels(c, horizon=0)
    assert "\n" not in str(e.value)


# --- walk-forward: no test fold sees its own future ------------------------------------------------------------

@pytest.mark.parametrize("horizon,embargo,n_folds,window", [(1, None, 3, "expanding"), (12, 12, 5, "expanding"),
                                                             (24, 48, 4, "expanding"), (12, 20, 5, "rolling")])
def test_no_training_label_reaches_its_test_fold(horizon, embargo, n_folds, window):
    c, f = random_market(3000, seed=horizon)
    res = train_walk_forward(c, f, horizon=horizon, embargo=embargo, n_folds=n_folds, window=window,
                             train_size=1000 if window == "rolling" else None, feature_spec=SPEC,
                             params={"max_iter": 10})
    idx = c.index
    y = make_labels(c, horizon).to_numpy()
    predictable = ~f.isna().any(axis=1).to_numpy()
    folds = walk_forward_folds(predictable & ~np.isnan(y), predictable, horizon, n_folds,
                               horizon if embargo is None else embargo, None, window,
                               1000 if window == "rolling" else None)
    assert len(folds) == n_folds == len(res.folds)
    for fold in folds:
        train_label_end = idx[fold.train + horizon].max()     # the last candle any training label looks at
        test_start = idx[fold.test].min()
        assert train_label_end < test_start
        assert fold.test.min() - fold.train.max() > (horizon if embargo is None else embargo)
        assert np.isfinite(y[fold.train]).all()                # never trains on an unknown future
    # the same fact as reported in the result's fold table
    fl = res.folds
    assert (pd.to_datetime(fl["train_label_end"]) < pd.to_datetime(fl["test_start"])).all()
    # OOS rows are exactly the test folds, in time order, each predicted once
    assert res.oos.index.is_monotonic_increasing and res.oos.index.is_unique
    assert len(res.oos) == sum(len(fd.test) for fd in folds)


def test_embargo_shorter_than_horizon_is_refused():
    c, f = random_market(1500)
    with pytest.raises(ModelError, match="embargo"):
        train_walk_forward(c, f, horizon=12, embargo=6, feature_spec=SPEC)


def test_too_little_data_is_one_line_error():
    c, f = random_market(150)
    with pytest.raises(ModelError) as e:
        train_walk_forward(c, f, horizon=12, n_folds=5, feature_spec=SPEC)
    assert "\n" not in str(e.value)


def test_a_leaky_feature_would_be_caught_by_oos_auc_but_a_causal_one_is_not_inflated():
    # A feature equal to the future label gives AUC 1 out of sample: the pipeline does not hide leaks...
    c, f = random_market(2500, seed=5)
    y = make_labels(c, 6)
    f2 = f.copy(); f2["a"] = y.fillna(0.5)
    leaky = train_walk_forward(c, f2, horizon=6, n_folds=3, feature_spec=SPEC, params={"max_iter": 20})
    assert leaky.overall["auc"] > 0.99
    # ...and pure-noise features stay near 0.5 out of sample (no look-ahead in fold construction).
    noise = train_walk_forward(c, f, horizon=6, n_folds=3, feature_spec=SPEC, params={"max_iter": 20})
    assert abs(noise.overall["auc"] - 0.5) < 0.06


# --- metrics -------------------------------------------------------------------------------------------------

def test_fold_with_one_class_gives_nan_auc_and_a_note_not_a_crash():
    # price rises a lot in every bar of the second half: every label there is 1
    c, f = random_market(2000, seed=1)
    close = c["close"].to_numpy().copy()
    close[1000:] = close[999] * np.exp(np.cumsum(np.full(1000, 0.01)))
    c["close"] = close
    res = train_walk_forward(c, f, horizon=3, n_folds=4, feature_spec=SPEC, params={"max_iter": 10})
    last = res.folds.iloc[-1]
    assert math.isnan(last["auc"]) and "AUC undefined" in last["note"] and last["positive_rate"] == 1.0
    assert not math.isnan(res.overall["auc"])


def test_metrics_against_sklearn():
    from sklearn.metrics import brier_score_loss, precision_score, roc_auc_score
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 500).astype(float)
    p = np.clip(y * 0.2 + rng.uniform(0, 0.8, 500), 0, 1)
    m = M.oos_metrics(y, p, 0.6)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["brier"] == pytest.approx(brier_score_loss(y, p))
    assert m["precision"] == pytest.approx(precision_score(y, p >= 0.6))
    assert m["n"] == 500 and m["positive_rate"] == pytest.approx(y.mean())


# --- the artifact ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from cryptobot.features import FEATURE_NAMES, build_features
    c, _ = random_market(2500, seed=3)
    f = build_features(c)
    res = train_walk_forward(c, f, horizon=6, n_folds=3, params={"max_iter": 20}, symbol="BTC/USDT",
                             timeframe="1h", thresholds=ThresholdPolicy(0.5, 0.4, 6), data_spec={"data": "synthetic"})
    d = tmp_path_factory.mktemp("models")
    return c, f, res, res.save(d), d


def test_artifact_roundtrip_and_manifest(trained):
    from cryptobot import features as F
    c, f, res, path, d = trained
    a = load_artifact(path)                                    # checks the feature fingerprint too
    man = a.manifest
    for k in M.REQUIRED_KEYS:
        assert k in man
    assert man["feature_fingerprint"] == F.fingerprint() and man["feature_names"] == list(F.FEATURE_NAMES)
    assert man["lookback"] == F.LOOKBACK and man["data"]["source"] == "synthetic"
    assert man["symbol"] == "BTC/USDT" and man["timeframe"] == "1h"
    assert man["label"]["horizon"] == 6 and man["label"]["cost"] == pytest.approx(0.003)
    assert man["strategy"] == M.policy_thresholds(man["policy"]).to_dict()     # the cost-aware policy, not 0.5/0.4
    assert man["policy"]["max_hold"] == 6 and man["metrics"]["entry_threshold"] == 0.5
    assert set(man["versions"]) >= {"python", "sklearn", "pandas", "numpy", "cryptobot"}
    assert len(man["metrics"]["folds"]) == 3 and "auc" in man["metrics"]["overall"]
    span = man["training_span"]
    assert pd.Timestamp(span["last"]) == c.index[-1 - 6]       # last labelled row
    assert a.strategy == M.policy_thresholds(man["policy"]) and a.policy == man["policy"]
    pd.testing.assert_frame_equal(a.oos, res.oos, check_freq=False)
    p = a.predict_proba(f)
    ok = ~f.isna().any(axis=1)
    assert p[~ok].isna().all() and p[ok].between(0, 1).all()
    assert np.allclose(p[ok], res.model.predict_proba(f[ok].to_numpy())[:, 1])
    # columns are taken by name: a shuffled frame gives the same answer
    assert np.allclose(a.predict_proba(f[f.columns[::-1]])[ok], p[ok])
    assert [x.name for x in d.iterdir() if x.name.startswith(".")] == []    # no temp dir left behind


def test_manifest_is_valid_json_without_nan(trained):
    *_, path, _ = trained
    text = (path / "manifest.json").read_text()
    json.loads(text, parse_constant=lambda s: (_ for _ in ()).throw(AssertionError(f"non-JSON constant {s}")))


def test_failed_write_leaves_nothing(trained, tmp_path, monkeypatch):
    _, _, res, _, _ = trained
    def boom(*a, **k): raise OSError("disk full")
    monkeypatch.setattr(M.joblib, "dump", boom)
    with pytest.raises(OSError):
        res.save(tmp_path)
    assert list(tmp_path.iterdir()) == []


def _copy(path, tmp_path):
    import shutil
    dst = tmp_path / path.name
    shutil.copytree(path, dst)
    return dst


@pytest.mark.parametrize("damage,match", [
    (lambda p: (p / "manifest.json").unlink(), "manifest.json missing"),
    (lambda p: (p / "oos.parquet").unlink(), "oos.parquet missing"),
    (lambda p: (p / "manifest.json").write_text("{not json"), "unreadable"),
    (lambda p: (p / "model.joblib").write_bytes(b"xx"), "checksum"),
    (lambda p: (p / "manifest.json").write_text(json.dumps(
        {k: v for k, v in json.loads((p / "manifest.json").read_text()).items() if k != "feature_names"})),
     "lacks feature_names"),
    (lambda p: (p / "manifest.json").write_text(json.dumps(
        {**json.loads((p / "manifest.json").read_text()), "feature_fingerprint": "0" * 64})), "fingerprint"),
])
def test_damaged_artifact_is_refused_in_one_line(trained, tmp_path, damage, match):
    *_, path, _ = trained
    p = _copy(path, tmp_path)
    damage(p)
    with pytest.raises(ModelError, match=match) as e:
        load_artifact(p)
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)


def test_missing_artifact(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_artifact(tmp_path / "nope")
    with pytest.raises(ModelError, match="no model artifact"):
        latest_model(tmp_path)


def test_latest_model_picks_newest_and_ignores_temp_dirs(trained, tmp_path):
    *_, path, _ = trained
    old = _copy(path, tmp_path)
    new = tmp_path / "zz-newer"
    import shutil
    shutil.copytree(path, new)
    man = json.loads((new / "manifest.json").read_text())
    man["created_utc"] = "2999-01-01T00:00:00+00:00"
    (new / "manifest.json").write_text(json.dumps(man))
    (tmp_path / ".tmp-partial").mkdir()
    assert latest_model(tmp_path) == new
    shutil.rmtree(new)
    assert latest_model(tmp_path) == old


def test_model_import_stays_light():
    code = ("import sys, cryptobot.model; bad = [m for m in ('vectorbt', 'plotly', 'matplotlib', 'papermill', "
            "'numba') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# --- the strategy rule ---------------------------------------------------------------------------------------------

def test_strategy_decisions_exhaustive():
    s = ThresholdPolicy(0.6, 0.4, 5)
    for p in np.linspace(0, 1, 21):
        assert s.decide(p, False) == ("enter" if p >= 0.6 else "flat")
        for held in range(1, 8):
            want = "exit" if (p < 0.4 or held >= 5) else "hold"
            assert s.decide(p, True, held) == want


def test_lean_artifact_predicts_like_sklearn_without_importing_it(tmp_path):
    "The live runner's load path: numpy trees, same probabilities, scikit-learn never imported."
    from cryptobot.data import synthetic_candles
    from cryptobot.features import build_features

    candles = synthetic_candles(3_000, seed=4)
    path = train_walk_forward(candles, n_folds=2, params={"max_iter": 40}).save(tmp_path)
    feats = build_features(candles).iloc[-400:]
    feats.to_parquet(tmp_path / "feats.parquet")
    full = load_artifact(path).predict_proba(feats)
    code = ("import sys, pandas as pd; from cryptobot.model import load_artifact; "
            f"a = load_artifact({str(path)!r}, lean=True); "
            f"p = a.predict_proba(pd.read_parquet({str(tmp_path / 'feats.parquet')!r})); "
            f"p.to_frame().to_parquet({str(tmp_path / 'lean.parquet')!r}); "
            "print(type(a.model).__name__, 'sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["TreeEnsemble", "False"], out
    lean = pd.read_parquet(tmp_path / "lean.parquet")["proba"]
    assert full.notna().sum() > 100
    np.testing.assert_allclose(lean.to_numpy(), full.to_numpy(), rtol=0, atol=1e-12)


# --- the cost-aware policy ---------------------------------------------------------------------------------------

def _oos(c, proba, n_folds=4, start=500):
    "An OOS frame like train_walk_forward's: folds of equal length after `start`, labels with horizon 12."
    idx = c.index[start:]
    fold = np.minimum((np.arange(len(idx)) * n_folds) // len(idx), n_folds - 1)
    y = M.make_labels(c).reindex(idx)
    return pd.DataFrame({"proba": np.asarray(proba)[start:], "fold": fold, "label": y}, index=idx)


def test_policy_never_trades_a_fold_without_an_after_cost_edge_on_earlier_folds():
    c, _ = random_market(6000, seed=3)
    p = np.random.default_rng(3).uniform(0.3, 0.7, len(c))             # no information at all
    tab, pol, final = M.cost_aware_policy(c, _oos(c, p))
    res = M.policy_backtest(c, pol)
    assert tab.loc[0, "trade"] == False and "no earlier" in tab.loc[0, "decision"]   # noqa: E712
    for k, row in tab.iterrows():
        in_k = res.trades["entry_time"].isin(pol.index[pol["fold"] == k])
        if not row["trade"]:
            assert not in_k.any() and row["train_return"] == 0.0
        else:
            assert row["train_return"] > 0
    fixed = M.ThresholdPolicy()
    from cryptobot.backtest import run_backtest
    assert res.stats["trades"] < run_backtest(c, _oos(c, p)["proba"], fixed, vectorbt=False).stats["trades"]


def test_no_trade_when_nothing_beats_costs():
    "Constant probabilities on a falling market: every candidate pair means 'always in', which loses: stay flat."
    c, _ = random_market(4000, seed=5, drift=-0.0003)
    tab, pol, final = M.cost_aware_policy(c, _oos(c, np.full(len(c), 0.5)))
    assert not tab["trade"].any() and final["trade"] is False
    assert M.policy_backtest(c, pol).stats["trades"] == 0


def test_a_folds_policy_depends_only_on_earlier_folds():
    c, _ = random_market(6000, seed=7, drift=0.0004)                      # drift: some thresholds beat costs
    rng = np.random.default_rng(7)
    p = np.clip(0.5 + 0.1 * rng.standard_normal(len(c)), 0, 1)
    o = _oos(c, p)
    tab, pol, _ = M.cost_aware_policy(c, o)
    k = 2
    later = o["fold"] >= k
    o2 = o.copy()
    o2.loc[later, "proba"] = rng.uniform(0, 1, later.sum())                # rewrite fold k's and later probabilities
    c2 = c.copy()
    cut = c.index.get_loc(o.index[later][0])
    c2.iloc[cut:, :4] = c2.iloc[cut:, :4] * 1.5                             # and fold k's prices
    tab2, _, _ = M.cost_aware_policy(c2, o2)
    cols = ["trade", "entry_threshold", "exit_threshold", "train_return", "train_trades"]
    pd.testing.assert_frame_equal(tab2.loc[:k, cols], tab.loc[:k, cols])
    assert tab.loc[:k, "trade"].any()                                      # the check is about a real choice
    assert not tab2.loc[k + 1:, cols].equals(tab.loc[k + 1:, cols])         # ...and the rewrite did matter later
    assert pol["proba_cal"].between(0, 1).all() or pol["proba_cal"].isna().any()


def test_training_stores_the_cost_aware_policy_in_the_manifest(trained):
    "manifest policy = cost_aware_policy's `final` on the OOS probabilities; per-fold table with flat folds said."
    c, f, res, path, d = trained
    man = load_artifact(path).manifest
    pol = man["policy"]
    assert set(pol) >= {"trade", "entry_threshold", "exit_threshold", "max_hold", "train_return", "train_trades",
                        "chosen_on"}
    tab, _, final = M.cost_aware_policy(c, res.oos, horizon=6, max_hold=6)
    for k in ("trade", "entry_threshold", "exit_threshold", "train_return", "train_trades"):
        assert pol[k] == final[k], k
    assert "out-of-sample" in pol["chosen_on"] and pol["flat_folds"] == int((~tab["trade"].astype(bool)).sum())
    assert [r["decision"] for r in man["policy_folds"]] == list(tab["decision"])
    assert man["policy_folds"][0]["decision"].startswith("flat")             # fold 0 has no earlier evidence


def test_a_policy_without_edge_after_costs_is_stored_as_no_trade():
    "A falling market with uninformative features: nothing beats costs, the manifest says trade: false."
    c, f = random_market(4000, seed=5, drift=-0.001)
    res = train_walk_forward(c, f, n_folds=3, params={"max_iter": 20}, feature_spec=SPEC)
    pol, st = res.manifest["policy"], ThresholdPolicy(**res.manifest["strategy"])
    assert pol["trade"] is False and pol["entry_threshold"] is None and pol["flat_folds"] == 3
    assert st.trade is False and all(st.decide(p, False) == "flat" for p in np.linspace(0, 1, 11))
    assert st.decide(0.5, True, 1) == "exit"                  # an open position is still closed
    from cryptobot.backtest import run_backtest
    assert run_backtest(c, res.oos["proba"], st, vectorbt=False).stats["trades"] == 0


def test_artifact_pickles_no_class_of_ours_and_one_naming_a_gone_class_is_refused_in_one_line(trained, tmp_path,
                                                                                              monkeypatch):
    """The thresholds class was renamed (`Strategy` -> `ThresholdPolicy`): it lives in the manifest as JSON, never in
    model.joblib, so artifacts saved before the rename still load. One whose pickle names a class this code no longer
    has is refused in one line."""
    import hashlib
    from joblib import numpy_pickle
    *_, path, _ = trained
    seen, find = [], numpy_pickle.NumpyUnpickler.find_class
    monkeypatch.setattr(numpy_pickle.NumpyUnpickler, "find_class", lambda self, mod, name: seen.append((mod, name)) or find(self, mod, name))
    load_artifact(path)
    monkeypatch.undo()
    assert seen and not [g for g in seen if g[0].startswith("cryptobot")], seen
    p = _copy(path, tmp_path)
    (p / "model.joblib").write_bytes(b"\x80\x04ccryptobot.model\nStrategy\n)\x81.")    # an object of the old class
    man = json.loads((p / "manifest.json").read_text())
    man["files"]["model.joblib"] = hashlib.sha256((p / "model.joblib").read_bytes()).hexdigest()
    (p / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ModelError, match=r"cannot read model/oos \(AttributeError\); retrain it") as e:
        load_artifact(p)
    assert "\n" not in str(e.value)
    with pytest.raises(AttributeError, match=r"^cryptobot.model.Strategy is now cryptobot.model.ThresholdPolicy"):
        M.Strategy                                                   # an old import says where the class went
