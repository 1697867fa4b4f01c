"""Unit tests of the evidence stages: learning curve, retention, domain shift, verdict, cost, max length choice."""

from __future__ import annotations

import numpy as np
import pytest

from fmtune.evidence import learning_curve, retention, verdict
from fmtune.evidence.domain_shift import domain_shift
from fmtune.evidence.evaluate import bootstrap_indices, classification_metrics, macro_f1
from fmtune.tasks.choices import choose_max_length


def test_nested_subsets_are_nested_and_stratified():
    y = np.array([0] * 80 + [1] * 20)
    subsets = learning_curve.nested_subsets(y, [0.125, 0.25, 0.5], seed=0)
    sizes = [len(s) for s in subsets.values()]
    assert sizes == [12, 25, 50]
    small, mid, big = subsets.values()
    assert set(small) <= set(mid) <= set(big)
    assert (y[big] == 1).sum() == 10


def test_power_law_forecast_recovers_a_known_curve():
    a, b = 2.0, 0.3
    n = np.array([100, 200, 400, 800])
    metric = 1 - a * n ** (-b)
    points = [{"train_examples": int(k), "metric": float(m)} for k, m in zip(n, metric)]
    boots = [np.full(50, m) + np.random.default_rng(i).normal(0, 0.005, 50) for i, m in enumerate(metric)]
    f = learning_curve.forecast(points, boots, target=0.8)
    assert f["params"]["a"] == pytest.approx(a, rel=1e-6) and f["params"]["b"] == pytest.approx(b, rel=1e-6)
    assert f["at_2x"]["train_examples"] == 1600
    assert f["at_2x"]["metric"] == pytest.approx(1 - a * 1600 ** (-b))
    lo, hi = f["at_2x"]["interval"]
    assert lo < f["at_2x"]["metric"] < hi
    assert f["target"]["train_examples"] == int(np.ceil((a / 0.2) ** (1 / b)))


def test_forecast_needs_three_sizes():
    f = learning_curve.forecast([{"train_examples": 10, "metric": 0.5}, {"train_examples": 20, "metric": 0.6}], [np.zeros(3)] * 2, None)
    assert "skipped" in f


def test_same_document_recall_and_cka():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 16))
    owners = np.repeat(np.arange(5), 6)
    emb = centers[owners] + 0.05 * rng.normal(size=(30, 16))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    assert retention.same_document_recall(emb, owners) == 1.0
    noise = rng.normal(size=(30, 16))
    assert retention.same_document_recall(noise / np.linalg.norm(noise, axis=1, keepdims=True), owners) < 0.5
    assert retention.linear_cka(emb, emb) == pytest.approx(1.0)
    assert retention.linear_cka(emb, emb @ np.linalg.qr(rng.normal(size=(16, 16)))[0]) == pytest.approx(1.0)  # rotation-invariant
    r = retention.retention(emb, noise, owners, "test", max_forgetting=0.2)
    assert r["flag"] is True and r["relative_change"] < -0.2 and r["higher_is_better"] is True


def test_general_documents_default_is_the_lee_corpus():
    docs, source = retention.general_documents(None)
    assert len(docs) == 300 and "Lee" in source
    sents, owners = retention.sentences_by_document(docs)
    assert 100 < len(sents) <= 600 and len(owners) == len(sents)


def test_general_documents_rejects_a_tiny_file(tmp_path):
    p = tmp_path / "g.txt"
    p.write_text("one\ntwo\n")
    with pytest.raises(Exception, match="at least 5 documents"):
        retention.general_documents(p)


def test_domain_shift_separates_different_and_not_same_distributions():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 8))
    same = domain_shift(a, rng.normal(size=(200, 8)), seed=0)
    far = domain_shift(a + 3.0, rng.normal(size=(200, 8)), seed=0)
    assert same["score"] < 0.65 and far["score"] > 0.95
    assert "far" in far["interpretation"]


def test_metrics_and_bootstrap_are_exact():
    y = np.array([0, 0, 1, 1, 1, 2])
    p = np.array([0, 1, 1, 1, 0, 2])
    assert macro_f1(y, p, 3) == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)
    boot = bootstrap_indices(len(y), 500, seed=0)
    m = classification_metrics(y, p, ["a", "b", "c"], boot)
    assert m["metrics"]["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"] == [[1, 1, 0], [1, 2, 0], [0, 0, 1]]
    lo, hi = m["ci95"]["macro_f1"]
    assert 0 <= lo <= m["metrics"]["macro_f1"] <= hi <= 1
    assert m["per_class_f1"] == pytest.approx({"a": 0.5, "b": 2 / 3, "c": 1.0})
    absent = classification_metrics(y, p, ["a", "b", "c", "d"], boot)["per_class_f1"]
    assert absent["d"] is None and absent["a"] == pytest.approx(0.5)  # no test example of 'd': no F1, not 0.0


def _ladder(values: dict[str, float]) -> list[dict]:
    return [{"name": k, "metrics": {"macro_f1": v}, "ci95": {"macro_f1": [v - 0.02, v + 0.02]}, "train_examples": 500, "train_seconds": 1.0} for k, v in values.items()]


def test_verdict_recommends_only_beyond_noise():
    rng = np.random.default_rng(0)
    base = rng.normal(0.6, 0.01, 1000)
    cost_ = verdict.cost(_ladder({"zero_shot": 0.5, "few_shot": 0.6, "fine_tuned": 0.8}), "CPU: x", 2, None, 0.0, "classification")
    clear = verdict.verdict(_ladder({"zero_shot": 0.5, "few_shot": 0.6, "fine_tuned": 0.8}), {"zero_shot": base - 0.1, "few_shot": base, "fine_tuned": base + 0.2}, "macro_f1", None, {}, None, cost_)
    assert clear["recommend_fine_tuning"] is True and clear["baseline"] == "few_shot" and clear["gain"] == pytest.approx(0.2)
    noisy = verdict.verdict(_ladder({"zero_shot": 0.5, "few_shot": 0.6, "fine_tuned": 0.61}), {"zero_shot": base, "few_shot": base, "fine_tuned": base + rng.normal(0.01, 0.05, 1000)}, "macro_f1", None, {}, None, cost_)
    assert noisy["recommend_fine_tuning"] is False and "inside the noise" in noisy["reasons"][0]


def test_verdict_prefers_head_only_when_it_is_as_good():
    rng = np.random.default_rng(1)
    base = rng.normal(0.6, 0.01, 1000)
    ladder = _ladder({"zero_shot": 0.5, "few_shot": 0.6, "head_only": 0.79, "fine_tuned": 0.8})
    cost_ = verdict.cost(ladder, "CPU: x", 2, 0.5, 0.0, "classification")
    v = verdict.verdict(ladder, {"zero_shot": base - 0.1, "few_shot": base, "head_only": base + 0.19 + rng.normal(0, 0.02, 1000), "fine_tuned": base + 0.2}, "macro_f1", None, {}, None, cost_)
    assert v["recommend_fine_tuning"] is False and any("head_only" in r for r in v["reasons"])
    assert cost_["price_per_hour"] == 0.5 and cost_["train_cost"] == pytest.approx(1.0 / 3600 * 0.5, rel=1e-3)


def test_verdict_says_when_fine_tuning_fell_below_head_only_and_was_still_improving():
    rng = np.random.default_rng(2)
    base = rng.normal(0.35, 0.01, 1000)
    ladder = _ladder({"zero_shot": 0.30, "few_shot": 0.32, "head_only": 0.47, "fine_tuned": 0.34})
    ladder[-1].update(history=[{"epoch": e} for e in range(1, 9)], best_epoch=8, stopped="reached the maximum of 8 epochs", still_improving=True)
    cost_ = verdict.cost(ladder, "CPU: x", 2, None, 0.0, "classification")
    boots = {"zero_shot": base - 0.05, "few_shot": base - 0.03, "head_only": base + 0.12, "fine_tuned": base + rng.normal(0, 0.02, 1000)}
    reasons = verdict.verdict(ladder, boots, "macro_f1", None, {}, None, cost_)["reasons"]
    assert any("below a linear head on the frozen FM (0.470) beyond the noise" in r for r in reasons)
    assert any("still improving on validation at its last epoch (8)" in r for r in reasons)
    ladder[-1].update(best_epoch=6, still_improving=False)
    assert not any("still improving" in r for r in verdict.verdict(ladder, boots, "macro_f1", None, {}, None, cost_)["reasons"])


def test_default_price_is_stated():
    price, source = verdict.default_price("CPU: x", 2)
    assert price == pytest.approx(0.096) and "stated, not measured" in source


def test_max_length_from_token_lengths():
    lengths = list(range(1, 101))
    m, why = choose_max_length(lengths, 512, None)
    assert m == 104 and "99th percentile" in why and "0 of 100" in why
    m, why = choose_max_length([600] * 10, 512, None)
    assert m == 512 and "capped" in why and "10 of 10" in why
    m, why = choose_max_length(lengths, 512, 32)
    assert m == 32 and "--max-length" in why


def test_learning_rate_choice_says_whether_it_is_the_default_or_a_flag():
    from fmtune.config import TrainConfig
    from fmtune.runner.pipeline import learning_rate_why as _learning_rate_why

    assert _learning_rate_why(TrainConfig(), lora=False).startswith("default (5e-05")
    assert _learning_rate_why(TrainConfig(learning_rate=1e-4), lora=False) == "--learning-rate"
    assert _learning_rate_why(TrainConfig(), lora=True).startswith("LoRA: 10x the fine-tuning rate, default")
    assert _learning_rate_why(TrainConfig(lora_learning_rate=1e-3), lora=True) == "--lora-learning-rate"


def test_epochs_choice_warns_when_validation_was_still_improving_at_the_last_epoch():
    from types import SimpleNamespace

    from fmtune.config import TrainConfig
    from fmtune.runner.pipeline import still_improving as _still_improving
    from fmtune.runner.pipeline import undertrained_caveat as _undertrained_caveat

    cfg = TrainConfig(epochs=8)
    assert _still_improving(SimpleNamespace(epochs_run=8, best_epoch=8), cfg) is True
    assert "probably undertrained: raise --epochs (now 8)" in _undertrained_caveat(cfg)
    assert _still_improving(SimpleNamespace(epochs_run=8, best_epoch=6), cfg) is False
    assert _still_improving(SimpleNamespace(epochs_run=4, best_epoch=4), cfg) is False  # stopped early on its own


def test_max_epochs_is_raised_for_small_training_sets_only_when_epochs_was_left_at_its_default():
    from fmtune.config import TrainConfig
    from fmtune.tasks.encoder import MAX_DERIVED_EPOCHS, MIN_TRAIN_STEPS, max_epochs

    assert MIN_TRAIN_STEPS == 300
    epochs, why = max_epochs(489, TrainConfig())  # 16 steps an epoch
    assert epochs == 19 and why.startswith("raised from the default 8: 489 training texts make 16 steps an epoch")
    assert max_epochs(2240, TrainConfig()) == (8, "default (8 epochs of 70 steps; early stopping may end sooner)")
    assert max_epochs(489, TrainConfig(epochs=5))[0] == 5  # the user's --epochs wins
    assert max_epochs(40, TrainConfig())[0] == MAX_DERIVED_EPOCHS == 30  # 2 steps an epoch: capped


def test_bare_number_labels_without_descriptions_get_a_zero_shot_warning():
    from fmtune.tasks.encoder import meaningless_label_names as _meaningless_label_names

    [warning] = _meaningless_label_names(["0", "1", "2"], {"2": "sports news"})
    assert warning.startswith("Labels '0', '1' are bare numbers") and "--label-descriptions '0=<what 0 means>;1=<what 1 means>'" in warning
    assert _meaningless_label_names(["neg", "pos"], {}) == []
    assert _meaningless_label_names(["0", "1"], {"0": "bad", "1": "good"}) == []
