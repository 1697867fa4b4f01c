"""The verdict's sentences, one rule each over the paired CIs: for every combination of outcomes of fine_tuned against
the best prompting rung, head_only and from_scratch, the sentences that must appear and those that must not, so that no
sentence says the opposite of the report's numbers."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from fmtune.evidence import verdict

# a paired difference (fine_tuned minus the rung) whose 95% CI is above 0, includes 0, or is below 0
OUTCOMES = {"above": (0.06, 0.01), "inside": (0.01, 0.05), "below": (-0.06, 0.01)}
N_TEST = 400


def _case(vs_prompting: str, vs_head: str, vs_scratch: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    ft_point, ft_boot = 0.70, 0.70 + rng.normal(0, 0.02, 2000)
    points, boots = {"fine_tuned": ft_point}, {"fine_tuned": ft_boot}
    for name, outcome in (("few_shot", vs_prompting), ("head_only", vs_head), ("from_scratch", vs_scratch)):
        d, spread = OUTCOMES[outcome]
        points[name] = ft_point - d
        boots[name] = ft_boot - (d + rng.normal(0, spread / 1.96, 2000))  # the difference's draws: d +- spread (95%)
    points["zero_shot"], boots["zero_shot"] = 0.30, ft_boot - 0.40
    ladder = [{"name": n, "metrics": {"macro_f1": points[n]}, "train_examples": 500, "train_seconds": 1.0} for n in ("zero_shot", "few_shot", "head_only", "from_scratch", "fine_tuned")]
    cost = verdict.cost(ladder, "CPU: x", 2, None, 0.0, "classification")
    return verdict.verdict(ladder, boots, "macro_f1", None, {}, None, cost, N_TEST), points


@pytest.mark.parametrize("vs_prompting,vs_head,vs_scratch", list(itertools.product(OUTCOMES, repeat=3)))
def test_each_sentence_follows_its_ci(vs_prompting, vs_head, vs_scratch):
    v, points = _case(vs_prompting, vs_head, vs_scratch)
    text = " ".join([v["headline"], *v["reasons"]])
    comparisons = v["comparisons"]
    assert comparisons["few_shot"]["outcome"] == vs_prompting and comparisons["head_only"]["outcome"] == vs_head and comparisons["from_scratch"]["outcome"] == vs_scratch

    # the headline answers against the strongest cheaper rung, and recommends only beyond the noise
    strongest = max(("zero_shot", "few_shot", "head_only"), key=points.get)
    assert v["strongest_alternative"] == strongest
    assert v["recommend_fine_tuning"] == (comparisons[strongest]["outcome"] == "above")
    assert (v["headline"].startswith("Fine-tuning helped")) == v["recommend_fine_tuning"]
    assert f"over {strongest} " in v["headline"]
    # the contract's gain is over the best prompting rung
    assert v["baseline"] == "few_shot" and v["gain"] == pytest.approx(points["fine_tuned"] - points["few_shot"])

    # pre-training: claimed only when fine_tuned beats from_scratch beyond the noise
    assert ("pre-training matters" in text) == (vs_scratch == "above")
    assert ("pre-training bought no measurable gain" in text) == (vs_scratch == "inside")
    assert ("did better than fine-tuning" in text) == (vs_scratch == "below")

    # head_only: always said; below it is always said, with the advice
    below_head = points["fine_tuned"] < points["head_only"]
    assert ("below a linear head on the frozen FM" in text) == below_head
    if below_head:
        assert "use head_only, or try a larger base model or more labeled data" in text
    assert ("beats a linear head on the frozen FM" in text) == (vs_head == "above")

    # every signed number next to "for fine-tuning"/"fine-tuning" matches the sign of its difference
    for name in ("few_shot", "head_only", "from_scratch"):
        d = points["fine_tuned"] - points[name]
        assert f"{d:+.3f}" in text, f"the difference with {name} is given"
    for claim in re.findall(r"fine-tuning (?:the pre-trained FM is better )?\(([+-]\d\.\d{3}), paired", text):
        assert float(claim) > 0 or "did better" in text or "no measurable" in text


def test_differences_below_what_the_test_set_detects_are_said_with_the_size_that_would():
    v, points = _case("inside", "inside", "inside")
    c = v["comparisons"]["head_only"]
    assert 0 < c["smallest_detectable"] and c["test_examples_needed"] > N_TEST
    lines = [r for r in v["reasons"] if r.startswith("this test set")]
    assert lines and all(f"({N_TEST} examples)" in r for r in lines)
    assert any(f"about {c['test_examples_needed']} test examples ({c['test_examples_needed'] - N_TEST} more)" in r for r in lines)
    clear, _ = _case("above", "above", "above")
    assert not any(r.startswith("this test set") for r in clear["reasons"])


def test_the_detectable_difference_shrinks_as_one_over_the_square_root_of_the_test_size():
    rng = np.random.default_rng(0)
    rows = lambda n: np.arange(n) % 2  # noqa: E731
    sizes = {}
    for n in (100, 400):
        y = rows(n)
        a = np.where(rng.random(n) < 0.8, y, 1 - y)
        b = np.where(rng.random(n) < 0.75, y, 1 - y)
        boot = np.random.default_rng(1).integers(0, n, size=(2000, n))
        ladder = [{"name": "fine_tuned", "metrics": {"acc": (a == y).mean()}}, {"name": "few_shot", "metrics": {"acc": (b == y).mean()}}]
        boots = {"fine_tuned": (a[boot] == y[boot]).mean(1), "few_shot": (b[boot] == y[boot]).mean(1)}
        sizes[n] = verdict.compare({r["name"]: r for r in ladder}, boots, "acc", "few_shot", n).detectable
    assert sizes[400] == pytest.approx(sizes[100] / 2, rel=0.2)


def test_a_fine_tune_that_did_not_learn_is_no_evidence():
    v, _ = _case("below", "below", "inside")
    assert not v["headline"].startswith("Fine-tuning did not learn")
    ladder_v, _ = _case("inside", "inside", "inside")
    rng = np.random.default_rng(0)
    ladder = [{"name": "few_shot", "metrics": {"macro_f1": 0.6}, "train_examples": 500, "train_seconds": 1.0},
              {"name": "fine_tuned", "metrics": {"macro_f1": 0.5}, "train_examples": 500, "train_seconds": 1.0, "learned": False}]
    boots = {"few_shot": 0.6 + rng.normal(0, 0.01, 500), "fine_tuned": 0.5 + rng.normal(0, 0.01, 500)}
    v = verdict.verdict(ladder, boots, "macro_f1", None, {}, None, verdict.cost(ladder, "CPU: x", 2, None, 0.0, "classification"), 300)
    assert v["headline"].startswith("Fine-tuning did not learn") and not v["recommend_fine_tuning"]
    assert any("the fine-tune did not learn" in r for r in v["reasons"])


def test_a_from_scratch_rung_that_did_not_learn_says_its_budget_and_how_to_raise_it():
    rng = np.random.default_rng(0)
    history = [{"epoch": e, "train_loss": 0.69} for e in range(1, 5)]
    ladder = [{"name": "few_shot", "metrics": {"macro_f1": 0.6}, "train_examples": 500, "train_seconds": 1.0},
              {"name": "from_scratch", "metrics": {"macro_f1": 0.33}, "train_examples": 500, "train_seconds": 1.0, "learned": False, "history": history},
              {"name": "fine_tuned", "metrics": {"macro_f1": 0.8}, "train_examples": 500, "train_seconds": 1.0}]
    boots = {r["name"]: r["metrics"]["macro_f1"] + rng.normal(0, 0.01, 500) for r in ladder}
    v = verdict.verdict(ladder, boots, "macro_f1", None, {}, None, verdict.cost(ladder, "CPU: x", 2, None, 0.0, "classification"), 300)
    text = " ".join([v["headline"], *v["reasons"]])
    assert "the from_scratch rung did not learn in its 4 epochs" in text and "--scratch-budget" in text
    assert "pre-training matters" not in text and "pre-training bought no measurable gain" not in text
