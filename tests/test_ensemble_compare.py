"""The default combination's validation guard, the verdict rule and the test split's group resamples."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from covid_ray.metrics import macro_f1
from ensemble.combine import DEFAULT_METHOD, combine, greedy_selection, soft_vote
from ensemble.evaluate import compare, split_resamples, verdict


def one_good_and_bad_members(seed: int = 0, n: int = 300, k: int = 3, bad: int = 4, good_at: int = 2):
    """One member right on every image at p=0.7; ``bad`` members confident (p=0.9) in a random class."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    members = [0.05 + 0.85 * np.eye(k)[rng.integers(0, k, n)] for _ in range(bad)]
    members.insert(good_at, 0.15 + 0.55 * np.eye(k)[labels])  # not ranked first: the guard must find it
    return np.stack(members), labels


def val_f1(probs: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> float:
    return macro_f1(labels, soft_vote(probs, weights))


def test_default_is_never_worse_than_its_best_member_where_soft_voting_is():
    probs, labels = one_good_and_bad_members()
    best = max(macro_f1(labels, p) for p in probs)
    assert best == 1.0 and val_f1(probs, labels) < best - 0.3  # the construction: uniform voting drowns it
    assert DEFAULT_METHOD == "guarded"
    c = combine(DEFAULT_METHOD, probs, labels, metric="val_macro_f1")
    assert val_f1(probs, labels, c.weights) >= best
    assert c.weights.sum() == pytest.approx(1) and (c.weights >= 0).all()
    assert c.best_member == 2 and c.member_val[2] == 1.0 and c.metric == "macro_f1"
    soft = combine("soft", probs, labels)
    assert np.allclose(soft.weights, 0.2) and soft.choice == "ensemble"  # soft stays uniform, unguarded
    assert soft.ensemble_val == pytest.approx(val_f1(probs, labels, soft.weights))


def test_guard_falls_back_to_the_best_member_when_the_nll_optimal_mixture_loses_macro_f1():
    # 450 of class 0, 50 of class 1. Member 0 always says [0.9, 0.1] (the prior): the lowest NLL
    # but never predicts class 1 (macro-F1 ~0.47). Member 1 gets every image right at p=0.6
    # except 10 confident mistakes: macro-F1 ~0.98 but a higher NLL, so greedy keeps mostly member 0.
    labels = np.array([0] * 450 + [1] * 50)
    prior = np.tile([0.9, 0.1], (500, 1))
    sharp = np.where(labels[:, None] == np.arange(2), 0.6, 0.4)
    sharp[:10] = [0.001, 0.999]
    probs = np.stack([prior, sharp])
    greedy = greedy_selection(probs, labels)[0]
    assert greedy[0] > 0.8 and val_f1(probs, labels, greedy) < 0.5  # the construction: NLL favours the prior
    c = combine("guarded", probs, labels)
    assert c.choice == "best_member" and np.allclose(c.weights, [0, 1]) and c.best_member == 1
    assert c.ensemble_val == pytest.approx(val_f1(probs, labels, greedy))
    assert c.member_val[1] == pytest.approx(val_f1(probs, labels, c.weights))
    assert c.member_val[1] > 0.9 > 0.5 > c.ensemble_val
    assert "worse" in c.reason and "best member is used alone" in c.reason
    summary = c.summary(["prior", "sharp"])
    assert summary["best_member"] == {"trial_id": "sharp", "val": c.member_val[1]}
    assert summary["choice"] == "best_member" and summary["split"] == "val"
    # Method greedy has no guard: it keeps the mixture, and says the comparison anyway.
    assert combine("greedy", probs, labels).choice == "ensemble"
    # A loss metric guards on NLL (lower is better), where the prior is the best member.
    assert combine("guarded", probs, labels, metric="val_loss").choice == "ensemble"


@pytest.mark.parametrize("seed", range(6))
def test_guarded_validation_macro_f1_is_at_least_the_best_members(seed):
    rng = np.random.default_rng(seed)
    n, k, m = 200, 4, 5
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(m, n, k)) * rng.uniform(0.5, 4, (m, 1, 1))
    logits[:, np.arange(n), labels] += rng.uniform(0, 2.5, (m, 1))
    probs = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)
    c = combine("guarded", probs, labels)
    assert val_f1(probs, labels, c.weights) >= max(macro_f1(labels, p) for p in probs) - 1e-12


def test_verdict_rule():
    assert verdict(0.05, 0.01, 0.09) == "beat"
    assert verdict(0.05, -0.01, 0.09) == "no clear difference"
    assert verdict(0.0, 0.0, 0.0) == "did not beat"
    assert verdict(-0.02, -0.05, 0.01) == "did not beat"
    assert verdict(float("nan"), float("nan"), float("nan")) == "did not beat"


def _manifest(groups=True) -> pd.DataFrame:
    frame = pd.DataFrame({
        "path": [f"p{i}.png" for i in range(8)], "label": ["a", "b"] * 4,
        "split": ["test"] * 6 + ["val"] * 2, "sha1": [f"s{i}" for i in range(8)],
    })
    if groups:
        frame["group"] = [0, 0, 0, 1, 2, 2, 3, 4]
    return frame


def test_split_resamples_use_the_manifest_groups_or_say_they_could_not():
    sha1 = [f"s{i}" for i in range(6)]
    resamples, info = split_resamples(_manifest(), "test", sha1, n_boot=50)
    assert resamples.by_group and info["unit"] == "duplicate group" and info["groups"] == 3 and info["images"] == 6
    assert "note" not in info
    old, info = split_resamples(_manifest(groups=False), "test", sha1, n_boot=50)
    assert not old.by_group and info["unit"] == "image" and info["groups"] == 6 and "older manifest" in info["note"]
    with pytest.raises(ValueError, match="do not match the evaluated images"):
        split_resamples(_manifest(), "test", sha1[::-1], n_boot=50)


def test_compare_is_paired():
    labels = np.array([0, 1] * 20)
    probs = np.eye(2)[labels] * 0.8 + 0.1
    resamples, _ = split_resamples(pd.DataFrame({"split": ["test"] * 40, "sha1": list(map(str, range(40))),
                                                 "group": np.arange(40) // 2}), "test", list(map(str, range(40))),
                                   n_boot=100)
    assert compare(labels, probs, probs, resamples) == {"macro_f1": 0.0, "ci95": [0.0, 0.0], "verdict": "did not beat"}


def test_find_recipe_reads_the_arm_column():
    from ensemble.reference import find_recipe

    base = {"trial_id": ["a", "b", "c"], "checkpoint": ["/a", "/b", "/c"]}
    row, note = find_recipe(pd.DataFrame(base))
    assert row is None and "no `arm` column" in note
    row, note = find_recipe(pd.DataFrame({**base, "arm": ["search", "warm_start", "search"]}))
    assert row is None and "no trial of this search has arm = recipe" in note
    row, note = find_recipe(pd.DataFrame({**base, "arm": ["search", "recipe", "recipe"]}))
    assert row["trial_id"] == "b" and note == ""  # at most one is expected; the first is used
