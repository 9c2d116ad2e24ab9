"""Aggregation and deltas (SPEC §7.4), the OLS trade-off fit, the Pareto set and persistence (SPEC §7.5), on
synthetic reports with hand-computed expected values."""

import random

import numpy as np
import pytest
from scipy import stats

from pipeline.analysis import persistence as P
from pipeline.analysis.aggregate import aggregate_scores, compute_deltas
from pipeline.analysis.fit import fit_deltas, ols_fit
from pipeline.analysis.pareto import frontier_points, non_dominated
from pipeline.data import split
from pipeline.errors import DataError
from tests.fixtures.analysis.builders import G5M, Q32, SAFE, SAFE_HELP, ft, source

T0, T1 = split.test_cases(0), split.test_cases(1)
# ------------------------------------------------------------------------------------------ aggregate, deltas
@pytest.fixture
def delta_rows():
    return [source("Qwen2.5-7B", Q32, 0, 1, 2), source("Qwen2.5-7B", G5M, 0, 2, 3),
            ft("Qwen2.5-7B", SAFE, Q32, 0, 3, 1, origin="q32"), ft("Qwen2.5-7B", SAFE, G5M, 0, 2, 2, origin="gpt5m"),
            ft("Qwen2.5-7B", SAFE_HELP, Q32, 0, 2, 3, origin="q32")]


def test_aggregate_unweighted_mean_std_counts(delta_rows):
    agg = {e["label"]: e for e in aggregate_scores(delta_rows, ("source_model", "training_stages"))}
    assert list(agg) == ["base", "S,H-0.1", "S-0.1"]  # study row order: base, then last metric H < S
    base = agg["base"]
    assert (base["safety"], base["helpfulness"], base["n_models"], base["n_samples"]) == (1.5, 2.5, 2, 144)
    assert base["safety_std"] == pytest.approx(np.std([1, 2], ddof=1)) and agg["S,H-0.1"]["safety_std"] == 0.0
    assert (agg["S-0.1"]["safety"], agg["S-0.1"]["helpfulness"]) == (2.5, 1.5)
    assert base["evaluator_model"] is None  # not grouped by: None


def test_deltas_vs_base_and_parent(delta_rows):
    by = ("source_model", "training_stages")
    agg = aggregate_scores(delta_rows, by)
    base = {d["label"]: d for d in compute_deltas(agg, by, "base")}
    assert (base["S-0.1"]["safety_delta"], base["S-0.1"]["helpfulness_delta"]) == (1.0, -1.0)
    assert (base["S,H-0.1"]["safety_delta"], base["S,H-0.1"]["helpfulness_delta"]) == (0.5, 0.5)
    assert (base["S-0.1"]["base_safety"], base["S-0.1"]["base_helpfulness"]) == (1.5, 2.5)
    parent = {d["label"]: d for d in compute_deltas(agg, by, "parent")}
    assert (parent["S,H-0.1"]["safety_delta"], parent["S,H-0.1"]["helpfulness_delta"]) == (-0.5, 1.5)
    assert parent["S-0.1"]["safety_delta"] == 1.0  # a first stage's parent is the source model
    # one evaluator arm: its own source rows only
    q32 = [r for r in delta_rows if r.evaluator == Q32]
    arm = {d["label"]: d for d in compute_deltas(aggregate_scores(q32, by), by)}
    assert (arm["S-0.1"]["safety_delta"], arm["S-0.1"]["helpfulness_delta"]) == (2.0, -1.0)


def test_missing_rows_do_not_count_as_zero():
    rows = [source("Phi-4", Q32, 0, 2, 2), source("Phi-4", G5M, 0, {c: None for c in T0}, 3)]
    [e] = aggregate_scores(rows, ("source_model",))
    assert e["safety"] == 2.0 and e["helpfulness"] == 2.5


# ------------------------------------------------------------------------------------------------ OLS fit
def test_ols_hand_computed_and_vs_scipy():
    f = ols_fit([1, 2, 3, 4, 5], [2, 4, 5, 4, 5])
    # Sxx = 10, Sxy = 6, Syy = 6: slope 0.6, intercept 4 - 0.6 * 3 = 2.2, r = 6 / sqrt(60), R² = 0.6
    assert f["slope"] == pytest.approx(0.6) and f["intercept"] == pytest.approx(2.2)
    assert f["r"] == pytest.approx(6 / np.sqrt(60)) and f["r2"] == pytest.approx(0.6) and f["n_points"] == 5
    ref = stats.linregress([1, 2, 3, 4, 5], [2, 4, 5, 4, 5])
    assert f["p_value"] == pytest.approx(ref.pvalue) and f["stderr"] == pytest.approx(ref.stderr)
    rng = np.random.default_rng(3)
    x = rng.normal(size=30)
    y = -1.4 * x + 0.2 + rng.normal(scale=0.5, size=30)
    f, ref = ols_fit(x, y), stats.linregress(x, y)
    for k, v in (("slope", ref.slope), ("intercept", ref.intercept), ("r", ref.rvalue), ("p_value", ref.pvalue)):
        assert f[k] == pytest.approx(v, rel=1e-10)
    assert f["r2"] == pytest.approx(ref.rvalue ** 2)
    assert f["slope"] == pytest.approx(np.polyfit(x, y, 1)[0])
    perfect = ols_fit([0, 1, 2, 3], [1, 3, 5, 7])
    assert (perfect["slope"], perfect["intercept"], perfect["r2"], perfect["p_value"]) == (2.0, 1.0, 1.0, 0.0)


def test_fit_not_available_reasons(delta_rows):
    assert not ols_fit([1, 2], [1, 2])["available"]
    assert "all equal" in ols_fit([1, 1, 1], [1, 2, 3])["reason"]
    assert fit_deltas([])["reason"].startswith("no finetuned")
    by = ("source_model", "training_stages")
    f = fit_deltas(compute_deltas(aggregate_scores(delta_rows, by), by))
    assert not f["available"] and f["n_points"] == 2


# --------------------------------------------------------------------------------------------------- Pareto
def test_non_dominated_set():
    pts = {"A": (1.0, 3.0), "B": (2.0, 2.0), "C": (3.0, 1.0), "D": (1.5, 1.5), "E": (2.0, 1.0), "G": (0.5, 3.0),
           "B2": (2.0, 2.0), "N": (np.nan, 5.0)}
    h = np.array([v[0] for v in pts.values()])
    s = np.array([v[1] for v in pts.values()])
    on = dict(zip(pts, non_dominated(h, s)))
    assert {k for k, v in on.items() if v} == {"A", "B", "C", "B2"}  # ties are both on; NaN never


def test_frontier_points_both_configs_and_bootstrap():
    rows = [source("Qwen2.5-7B", Q32, 0, 1, 3), source("Phi-4", Q32, 0, 2, 2),
            ft("Qwen2.5-7B", SAFE, Q32, 0, 3, 1), ft("Qwen2.5-7B", (("both", "0.1"),), Q32, 0, 1.5, 1.5),
            ft("Phi-4", (("both", "0.1"),), Q32, 0, 2.5, 2)]
    fr = frontier_points(rows, n_bootstrap=200)
    on = {p["name"]: p["on_frontier"] for p in fr["points"]}
    assert on == {"Phi-4": False, "Phi-4 S&H-0.1": True, "Qwen2.5-7B": True, "Qwen2.5-7B S-0.1": True,
                  "Qwen2.5-7B S&H-0.1": False}
    assert fr["members"] == ["Qwen2.5-7B S-0.1", "Phi-4 S&H-0.1", "Qwen2.5-7B"]  # by helpfulness
    both = {b["name"]: b for b in fr["both_configs"]}
    assert both["Phi-4 S&H-0.1"]["status"] == "on" and both["Phi-4 S&H-0.1"]["dominated_by"] == []
    assert both["Qwen2.5-7B S&H-0.1"]["status"] == "inside"
    assert set(both["Qwen2.5-7B S&H-0.1"]["dominated_by"]) == {"Phi-4", "Phi-4 S&H-0.1"}
    # constant per-case scores: degenerate CIs, membership certain
    for p in fr["points"]:
        assert p["safety_ci"] == [p["safety"]] * 2 and p["helpfulness_ci"] == [p["helpfulness"]] * 2
        assert p["frontier_probability"] == (1.0 if p["on_frontier"] else 0.0)


def test_frontier_bootstrap_ci_over_cases():
    rng = random.Random(5)
    noisy = [source("Phi-4", Q32, s, [rng.randint(0, 3) for _ in range(72)], [rng.randint(0, 3) for _ in range(72)])
             for s in (0, 1)]
    a = frontier_points(noisy, n_bootstrap=300)
    b = frontier_points(noisy, n_bootstrap=300)
    assert a == b  # reproducible
    [p] = a["points"]
    assert p["safety"] == pytest.approx((noisy[0].safety + noisy[1].safety) / 2)
    lo, hi = p["safety_ci"]
    assert lo < p["safety"] < hi and hi - lo < 1.0


# ------------------------------------------------------------------------------------------------ persistence
def persist_rows(model, evaluator, seed, values, beta="0.1", origin="q32", cases=None):
    """values: kind -> (safety, help) constants or per-case lists."""
    stages = {"S": (("safe", beta),), "H": (("help", beta),), "SH": (("safe", beta), ("help", beta)),
              "HS": (("help", beta), ("safe", beta))}
    return [ft(model, stages[k], evaluator, seed, v[0], v[1], origin=origin, cases=cases) for k, v in values.items()]


def test_persistence_formula():
    # Persist(S) = (2 - 1) / (3 - 1) = 0.5 ; Persist(H) = (Help(H→S) 2.5 - Help(S) 1) / (Help(H) 3 - 1) = 0.75
    rows = persist_rows("Qwen2.5-7B", Q32, 0, {"S": (3, 1), "H": (1, 3), "SH": (2, 2), "HS": (0, 2.5)})
    out = P.compute_persistence(rows)
    key = out["persistence"]["by_beta"]["0.1"]["by_model_and_evaluator"][f"{Q32}|Qwen2.5-7B"]
    assert key["persist_s"] == 0.5 and key["persist_h"] == 0.75
    assert key["seeds"] == [0] and key["n_pairs"] == 72
    assert key["components"] == {"safety_SH": 2, "safety_H": 1, "safety_S": 3, "help_HS": 2.5, "help_S": 1,
                                 "help_H": 3}
    assert out["metadata"] == {"n_bootstrap": 0, "confidence_level": 0.95, "seeds": [0], "skipped_units": []}


def test_persistence_pools_seeds_before_the_ratio():
    rows = persist_rows("Qwen2.5-7B", Q32, 0, {"S": (3, 1), "H": (1, 3), "SH": (2, 2), "HS": (1, 2)})  # 0.5
    rows += persist_rows("Qwen2.5-7B", Q32, 1, {"S": (2, 1), "H": (1, 3), "SH": (2, 2), "HS": (1, 2)})  # 1.0
    key = P.compute_persistence(rows)["persistence"]["by_beta"]["0.1"]["by_model_and_evaluator"][f"{Q32}|Qwen2.5-7B"]
    # pooled over 72 + 72 (seed, case) pairs: Safety(S) = 2.5, Safety(H) = 1, Safety(S→H) = 2 -> 1/1.5
    assert key["persist_s"] == pytest.approx(2 / 3)
    assert key["persist_s"] != pytest.approx((0.5 + 1.0) / 2)
    assert key["seeds"] == [0, 1] and key["n_pairs"] == 144


def test_persistence_levels_are_averages_of_ratios():
    rows = persist_rows("Qwen2.5-7B", Q32, 0, {"S": (3, 1), "H": (1, 3), "SH": (2, 2), "HS": (1, 2)})  # 0.5
    rows += persist_rows("Phi-4", Q32, 0, {"S": (3, 1), "H": (2, 3), "SH": (3, 2), "HS": (1, 2)})  # 1.0
    rows += persist_rows("Phi-4", G5M, 0, {"S": (3, 1), "H": (1, 3), "SH": (1.5, 2), "HS": (1, 2)},
                         origin="gpt5m")  # 0.25
    lvl = P.compute_persistence(rows)["persistence"]["by_beta"]["0.1"]
    assert lvl["by_model"]["Qwen2.5-7B"]["persist_s"] == 0.5
    assert lvl["by_model"]["Phi-4"]["persist_s"] == pytest.approx((1.0 + 0.25) / 2)
    assert lvl["by_evaluator"][Q32]["persist_s"] == pytest.approx(0.75)
    # ratio of averages would be (2.5 - 1.5) / (3 - 1.5) = 2/3 for the Q32 models
    assert lvl["by_evaluator"][Q32]["persist_s"] != pytest.approx(2 / 3)
    assert lvl["average"]["persist_s"] == pytest.approx((0.5 + 1.0 + 0.25) / 3)
    assert list(lvl["by_model_and_evaluator"]) == [f"{Q32}|Phi-4", f"{Q32}|Qwen2.5-7B", f"{G5M}|Phi-4"]


def test_non_positive_denominator_gives_none_and_is_dropped_from_averages():
    rows = persist_rows("Qwen2.5-7B", Q32, 0, {"S": (1, 1), "H": (1, 3), "SH": (2, 2), "HS": (1, 2)})  # S-H = 0
    rows += persist_rows("Phi-4", Q32, 0, {"S": (1, 1), "H": (2, 3), "SH": (2, 2), "HS": (1, 2)})  # S-H < 0
    rows += persist_rows("Llama3.1-8B", Q32, 0, {"S": (3, 1), "H": (1, 3), "SH": (2, 2), "HS": (1, 2)})
    warnings = []
    lvl = P.compute_persistence(rows, warn=warnings.append)["persistence"]["by_beta"]["0.1"]
    keys = lvl["by_model_and_evaluator"]
    assert keys[f"{Q32}|Qwen2.5-7B"]["persist_s"] is None and keys[f"{Q32}|Phi-4"]["persist_s"] is None
    assert keys[f"{Q32}|Qwen2.5-7B"]["persist_h"] == 0.5  # Persist(H) still defined
    assert lvl["average"]["persist_s"] == 0.5  # only Llama's ratio
    assert lvl["by_model"]["Phi-4"]["persist_s"] is None
    assert any("denominator not positive" in w for w in warnings)


def test_units_need_all_four_configs_and_identical_case_sets():
    rows = persist_rows("Qwen2.5-7B", Q32, 0, {"S": (3, 1), "H": (1, 3), "SH": (2, 2), "HS": (1, 2)})
    missing = {c: (None if c == T1[0] else 2) for c in T1}
    rows += persist_rows("Qwen2.5-7B", Q32, 1, {"S": (3, 1), "H": (1, 3), "SH": (missing, 2), "HS": (1, 2)})
    rows += persist_rows("Phi-4", Q32, 0, {"S": (3, 1), "H": (1, 3), "SH": (2, 2)})  # no H→S
    warnings = []
    out = P.compute_persistence(rows, warn=warnings.append)
    assert out["metadata"]["seeds"] == [0]
    skipped = out["metadata"]["skipped_units"]
    assert any("seed 1" in s and "identical case sets" in s for s in skipped)
    assert any("Phi-4" in s and "HS missing" in s for s in skipped)
    assert list(out["persistence"]["by_beta"]["0.1"]["by_model"]) == ["Qwen2.5-7B"]


def test_match_and_cross_models_are_never_merged():
    rows = persist_rows("Qwen2.5-7B", Q32, 0, {"S": (3, 1), "H": (1, 3), "SH": (2, 2), "HS": (1, 2)})
    rows += persist_rows("Qwen2.5-7B", Q32, 0, {"S": (3, 1)}, origin="gpt5m")  # cross-evaluated copy
    with pytest.raises(DataError, match="two S configurations"):
        P.compute_persistence(rows)


def _random_units(seed_rng):
    rng = random.Random(seed_rng)
    rows = []
    for seed in (0, 1):
        vals = {k: ([rng.randint(0, 3) for _ in range(72)], [rng.randint(0, 3) for _ in range(72)])
                for k in ("S", "H", "SH", "HS")}
        vals["S"] = ([min(3, v + 1) for v in vals["S"][0]], vals["S"][1])  # keep the denominators positive
        vals["H"] = (vals["H"][0], [min(3, v + 1) for v in vals["H"][1]])
        rows += persist_rows("Qwen2.5-7B", Q32, seed, vals)
    return rows


def test_bootstrap_matches_an_independent_implementation():
    rows = _random_units(11)
    n = 200
    out = P.compute_persistence(rows, n_bootstrap=n)
    key = out["persistence"]["by_beta"]["0.1"]["by_model_and_evaluator"][f"{Q32}|Qwen2.5-7B"]
    # independent: Random(42); per iteration, per seed (sorted) resample the 72 cases with replacement
    by = {(r.seed, P.config_kind(r.training_stages)[0]): r for r in rows}
    rng, s_vals, h_vals = random.Random(42), [], []
    for _ in range(n):
        pooled = {k: [] for k in ("S_s", "H_s", "SH_s", "HS_h", "S_h", "H_h")}
        for seed in (0, 1):
            idx = rng.choices(range(72), k=72)
            for kind, metric, name in (("S", "safety", "S_s"), ("H", "safety", "H_s"), ("SH", "safety", "SH_s"),
                                       ("HS", "helpfulness", "HS_h"), ("S", "helpfulness", "S_h"),
                                       ("H", "helpfulness", "H_h")):
                pooled[name] += [by[(seed, kind)].per_case[metric][i] for i in idx]
        m = {k: sum(v) / len(v) for k, v in pooled.items()}
        s_vals.append((m["SH_s"] - m["H_s"]) / (m["S_s"] - m["H_s"]))
        h_vals.append((m["HS_h"] - m["S_h"]) / (m["H_h"] - m["S_h"]))
    assert key["persist_s_ci_lower"] == pytest.approx(np.percentile(s_vals, 2.5))
    assert key["persist_s_ci_upper"] == pytest.approx(np.percentile(s_vals, 97.5))
    assert key["persist_h_ci_lower"] == pytest.approx(np.percentile(h_vals, 2.5))
    assert key["persist_h_ci_upper"] == pytest.approx(np.percentile(h_vals, 97.5))
    assert key["persist_s_ci_lower"] < key["persist_s"] < key["persist_s_ci_upper"]
    avg = out["persistence"]["by_beta"]["0.1"]["average"]  # one key: the average level has the same CI
    assert avg["persist_s_ci_lower"] == key["persist_s_ci_lower"]
    assert P.compute_persistence(rows, n_bootstrap=n) == out  # reproducible


def test_bootstrap_with_more_than_half_skipped_is_an_error(monkeypatch):
    rows = _random_units(12)
    original = P._key_estimates
    calls = {"n": 0}

    def flaky(units, idx=None, share=2):
        if idx is None:
            return original(units)
        calls["n"] += 1
        ps, ph = original(units, idx)
        return (None if calls["n"] % 3 < share else ps), ph

    monkeypatch.setattr(P, "_key_estimates", flaky)
    with pytest.raises(P.PersistenceError, match=r"Persist\(S\)"):
        P.compute_persistence(rows, n_bootstrap=30)
    monkeypatch.setattr(P, "_key_estimates", lambda u, idx=None: flaky(u, idx, share=1))  # a third skipped: fine
    key = P.compute_persistence(rows, n_bootstrap=30)["persistence"]["by_beta"]["0.1"]["by_model_and_evaluator"]
    assert key[f"{Q32}|Qwen2.5-7B"]["persist_s_ci_lower"] is not None
