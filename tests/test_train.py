"""fmtune.training.train and fmtune.evidence.evaluate on a tiny random BERT (CPU, seconds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_reviews

from fmtune.config import TrainConfig
from fmtune.evidence.evaluate import embed, predict_logits
from fmtune.models import loading
from fmtune.training import train


@pytest.fixture(scope="module")
def data(tiny_bert):
    tok = loading.load_tokenizer(tiny_bert)
    rows = make_reviews(96, seed=1)
    texts = [t for t, _ in rows]
    y = np.array([0 if lab == "neg" else 1 for _, lab in rows], dtype=np.int64)
    ids = train.token_ids(tok, texts, 32)
    return tok, texts, ids, y


def _fit(tiny_bert, data, seed=0, **overrides):
    tok, _, ids, y = data
    torch.manual_seed(seed)
    model = loading.load_classifier(tiny_bert, ["neg", "pos"])
    cfg = TrainConfig(**{"epochs": 2, "batch_size": 16, "patience": 2, **overrides})
    result = train.fit(model, tok, (ids[:64], y[:64]), (ids[64:], y[64:]), cfg, learning_rate=1e-3, n_classes=2, seed=seed, bf16=overrides.get("bf16") == "on")
    return model, result


def test_fit_moves_weights_and_records_levers(tiny_bert, data):
    before = loading.load_classifier(tiny_bert, ["neg", "pos"]).bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    model, result = _fit(tiny_bert, data)
    after = result.model.bert.encoder.layer[0].attention.self.query.weight
    assert not torch.equal(before, after)
    assert result.steps == 2 * 4 and result.epochs_run == 2 and len(result.history) == 2
    assert result.real_tokens == 2 * sum(len(r) for r in data[2][:64])
    assert result.levers["bf16"] is False and result.levers["length_bucketing"] is True and result.levers["dynamic_padding"] is True
    assert result.levers["fused_optimizer"] is True and result.levers["torch_compile"] is False and result.levers["dropout"] == pytest.approx(0.1)


@pytest.mark.parametrize("bf16", ["off", "on"])
def test_new_head_trains_at_its_own_learning_rate(tiny_bert, data, bf16):
    tok, _, ids, y = data
    assert loading.load_classifier_and_head(tiny_bert, ["neg", "pos"], from_scratch=True)[1] == frozenset()
    torch.manual_seed(0)
    model, head = loading.load_classifier_and_head(tiny_bert, ["neg", "pos"])
    assert head == {"classifier.weight", "classifier.bias"}
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(epochs=1, batch_size=16, bf16=bf16)
    result = train.fit(model, tok, (ids[:64], y[:64]), (ids[64:], y[64:]), cfg, learning_rate=1e-3, n_classes=2, seed=0, bf16=bf16 == "on",
                       head=head, head_learning_rate=1e-9)
    moved = {n: (p.detach() - start[n]).abs().max().item() for n, p in result.model.named_parameters()}
    assert moved["classifier.weight"] < 1e-6 and moved["classifier.bias"] < 1e-6
    assert moved["bert.encoder.layer.0.attention.self.query.weight"] > 1e-4 and moved["bert.pooler.dense.weight"] > 1e-4


def test_bf16_on_runs(tiny_bert, data):
    _, result = _fit(tiny_bert, data, bf16="on")
    assert result.levers["bf16"] is True
    assert all(np.isfinite(h["train_loss"]) for h in result.history)


def test_same_seed_same_weights(tiny_bert, data):
    _, a = _fit(tiny_bert, data)
    _, b = _fit(tiny_bert, data)
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    assert a.history == [{**h, "seconds": a.history[i]["seconds"]} for i, h in enumerate(b.history)]


def test_levers_turn_off(tiny_bert, data):
    _, result = _fit(tiny_bert, data, length_bucketing=False, dropout=0.0)
    assert result.levers["length_bucketing"] is False


def test_early_stopping_keeps_best_epoch(tiny_bert, data, monkeypatch):
    """Selection on validation macro-F1 (the rule for a validation split with enough texts per class), early stopping
    from epoch 1 and no chance check: the loop's plain early stopping."""
    scores = iter([0.5, 0.9, 0.7, 0.6, 0.95])  # epoch 2 is best; epochs 3 and 4 do not improve: stop after 4 (0.95: the final validation pass)
    monkeypatch.setattr("fmtune.evidence.evaluate.macro_f1", lambda y, p, k: next(scores))
    monkeypatch.setattr(train, "selection_rule", lambda y, k: ("metric", "test"))
    monkeypatch.setattr(train, "min_epochs", lambda n, b, e: 1)
    monkeypatch.setattr(train, "chance_loss", lambda y, k, w: None)
    snapshots = []
    real = train.evaluate_split

    def spy(model, *args, **kwargs):
        snapshots.append(model.classifier.weight.detach().clone())
        return real(model, *args, **kwargs)

    monkeypatch.setattr(train, "evaluate_split", spy)
    _, result = _fit(tiny_bert, data, epochs=5, patience=2)
    assert [h["val_macro_f1"] for h in result.history] == [0.5, 0.9, 0.7, 0.6]
    assert result.best_epoch == 2 and result.epochs_run == 4 and result.stopped.startswith("early stopping")
    assert torch.equal(result.model.classifier.weight, snapshots[1])
    assert not torch.equal(result.model.classifier.weight, snapshots[3])


def test_class_weights():
    y = np.array([0] * 8 + [1] * 2)
    w, why = train.class_weight_vector(y, 2, "auto")
    assert w.tolist() == [10 / (2 * 8), 10 / (2 * 2)] and "4.00x" in why
    assert train.class_weight_vector(np.array([0, 0, 0, 1, 1]), 2, "auto")[0] is None  # 1.5x: plain loss
    assert train.class_weight_vector(y, 2, "none")[0] is None
    assert train.class_weight_vector(np.array([0, 1, 1]), 3, "balanced")[0].tolist() == [1.0, 0.5, 1.0]  # an absent class counts as 1


@pytest.mark.parametrize("bucketing", [True, False])
def test_length_batches_cover_every_index_once(bucketing):
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 60, size=3333)
    batches = train.length_batches(lengths, 32, np.random.default_rng(1), bucketing)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(3333))
    assert max(len(b) for b in batches) == 32
    spread = np.mean([np.ptp(lengths[b]) for b in batches if len(b) == 32])
    assert spread <= 2 if bucketing else spread > 30


def test_batch_tensors_cut_to_longest():
    table, lengths = train.pad_table([[2, 5, 3], [2, 3], [2, 7, 7, 7, 3]], pad_id=0)
    assert table.shape == (3, 5) and lengths.tolist() == [3, 2, 5]
    ids, mask = train.batch_tensors(table, lengths, np.array([1, 0]), "cpu")
    assert ids.tolist() == [[2, 3, 0], [2, 5, 3]] and mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    ids, mask = train.batch_tensors(table, lengths, np.array([1]), "cpu", pad_to=4)
    assert ids.tolist() == [[2, 3, 0, 0]] and mask.tolist() == [[1, 1, 0, 0]]


def test_eval_matches_unbatched_in_input_order(tiny_bert, data):
    tok, texts, ids, y = data
    model = loading.load_classifier(tiny_bert, ["neg", "pos"]).eval()
    logits = predict_logits(model, tok, texts[:20], 32, batch_size=7)
    with torch.no_grad():
        one = [model(**tok(t, return_tensors="pt")).logits[0].numpy() for t in texts[:20]]
    np.testing.assert_allclose(logits, np.stack(one), atol=1e-5)
    loss, preds = train.evaluate_split(model, ids[:20], y[:20], tok.pad_token_id, 7, False)
    assert preds.tolist() == np.stack(one).argmax(1).tolist()
    expected = torch.nn.functional.cross_entropy(torch.tensor(np.stack(one)), torch.tensor(y[:20])).item()
    assert loss == pytest.approx(expected, abs=1e-5)
    emb = embed(loading.load_encoder(tiny_bert), tok, texts[:20], 32, batch_size=7)
    assert emb.shape == (20, 32) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_bf16_supported_decides_by_measurement(monkeypatch):
    monkeypatch.setattr(loading, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    monkeypatch.setattr(loading, "bf16_speedup", lambda: 0.9)
    assert loading.bf16_supported(torch.device("cpu")) is False
    monkeypatch.setattr(loading, "bf16_speedup", lambda: 1.6)
    assert loading.bf16_supported(torch.device("cpu")) is True
    monkeypatch.setattr(loading, "cpu_flags", lambda: frozenset({"avx2"}))
    assert loading.bf16_supported(torch.device("cpu")) is False


def test_best_weights_parked_on_disk_not_in_memory(tmp_path, monkeypatch):
    """Above BEST_IN_MEMORY_BYTES (a large model) the best weights go to a file instead of a second copy in RAM."""
    import torch

    from fmtune.training import loop
    from fmtune.training.train import BestWeights

    monkeypatch.setattr(loop, "BEST_IN_MEMORY_BYTES", 0)  # BestWeights lives in fmtune.training.loop (fmtune.training.train re-exports it)

    state = {"a": torch.randn(4, 3), "b": torch.arange(5.0)}
    best = BestWeights(tmp_path / "ckpt", in_memory=False)
    best.set(state)
    assert best._state is None and best._file is not None and best._file.is_file()
    got = best.get()
    assert all(torch.equal(got[k], state[k]) for k in state)
    state["a"].add_(1.0)  # later training steps must not change the parked copy
    assert not torch.equal(best.get()["a"], state["a"])
    best.close()
    assert not list((tmp_path / "ckpt").glob(".best-*"))


def test_best_weights_with_tied_tensors_are_parked_too(tmp_path, monkeypatch):
    import torch

    from fmtune.training import loop
    from fmtune.training.train import BestWeights

    monkeypatch.setattr(loop, "BEST_IN_MEMORY_BYTES", 0)  # BestWeights lives in fmtune.training.loop (fmtune.training.train re-exports it)

    shared = torch.randn(3, 3)
    best = BestWeights(None, in_memory=False)
    best.set({"embed": shared, "head": shared})  # tied weights: written once per name, both come back
    assert best._state is None and best._file is not None
    got = best.get()
    assert torch.equal(got["head"], shared) and torch.equal(got["embed"], shared)
    best.close()


def test_small_best_weights_stay_in_memory_and_write_nothing(tmp_path):
    """A small model's best weights are kept in RAM: writing them at every improving epoch rewrote the model's size to
    disk again and again (part of the 14 GB a run of 88 MB wrote)."""
    import torch

    from fmtune.training.train import BestWeights

    best = BestWeights(tmp_path / "ckpt", in_memory=False)
    state = {"a": torch.randn(4, 3)}
    best.set(state)
    assert best.file is None and not list((tmp_path / "ckpt").rglob("*.safetensors"))
    assert torch.equal(best.get()["a"], state["a"])
    best.close()


def test_selection_rule_by_the_smallest_validation_class():
    rule, why = train.selection_rule(np.array([0] * 30 + [1] * 30), 2)
    assert rule == "metric" and "at least 30" in why
    rule, why = train.selection_rule(np.array([0] * 100 + [1] * 29), 2)
    assert rule == "calibrated" and "29 validation texts" in why
    assert train.selection_rule(np.array([0] * 40), 2)[0] == "calibrated", "a class missing from validation"


def test_calibrated_loss_does_not_move_when_a_model_only_grows_more_confident():
    """The same decisions at a higher confidence: the raw loss rises (the wrong answers cost more), the calibrated one stays."""
    from scipy.special import log_softmax

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    logits = rng.normal(0, 1, (200, 3))
    logits[np.arange(200), y] += 1.0
    raw = lambda z: float(-log_softmax(z, axis=1)[np.arange(200), y].mean())  # noqa: E731
    assert raw(logits * 4) > raw(logits) + 0.1
    a, t_a = train.calibrated_loss(logits, y)
    b, t_b = train.calibrated_loss(logits * 4, y)
    assert a == pytest.approx(b, abs=1e-4) and t_b == pytest.approx(4 * t_a, rel=1e-2)
    assert a <= raw(logits) + 1e-9
    weighted, _ = train.calibrated_loss(logits, y, np.array([1.0, 2.0, 3.0]))
    assert weighted != pytest.approx(a)


def test_chance_loss_is_the_entropy_of_the_prior_the_loss_weighs():
    y = np.array([0] * 75 + [1] * 25)
    assert train.chance_loss(y, 2, None) == pytest.approx(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25)))
    balanced, _ = train.class_weight_vector(y, 2, "balanced")
    assert train.chance_loss(y, 2, balanced) == pytest.approx(np.log(2))
    assert train.min_epochs(64, 16, 10) == 8 and train.min_epochs(6400, 16, 10) == 2 and train.min_epochs(64, 16, 5) == 5
