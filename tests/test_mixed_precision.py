"""fmtune.training.mixed_precision: the bf16 compute copy with fp32 masters, the sparse embedding gradient and the clip, on a tiny
random BERT (CPU, seconds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_reviews

from fmtune.config import TrainConfig
from fmtune.models import loading
from fmtune.training import train
from fmtune.training.mixed_precision import Bf16Copy, SparseEmbeddingGrad, clip_grad_norm


@pytest.fixture(scope="module")
def data(tiny_bert):
    tok = loading.load_tokenizer(tiny_bert)
    rows = make_reviews(96, seed=1)
    ids = train.token_ids(tok, [t for t, _ in rows], 32)
    y = np.array([0 if lab == "neg" else 1 for _, lab in rows], dtype=np.int64)
    return tok, ids, y


def _fit(tiny_bert, data, checkpoint_dir=None, progress=None, head_learning_rate=None, **overrides):
    tok, ids, y = data
    torch.manual_seed(0)
    model, head = loading.load_classifier_and_head(tiny_bert, ["neg", "pos"])
    cfg = TrainConfig(**{"epochs": 2, "batch_size": 16, "patience": 2, "dropout": 0.0, **overrides})
    bf16 = overrides.pop("bf16", "off") == "on"
    return train.fit(model, tok, (ids[:64], y[:64]), (ids[64:], y[64:]), cfg, learning_rate=1e-3, n_classes=2, seed=0, bf16=bf16,
                     checkpoint_dir=checkpoint_dir, progress=progress, head=head, head_learning_rate=head_learning_rate)


def _batch(data, model):
    tok, ids, y = data
    table, lengths = train.pad_table(ids[:16], tok.pad_token_id)
    input_ids, mask = train.batch_tensors(table, lengths, np.arange(16), "cpu")
    return input_ids, mask, torch.as_tensor(y[:16])


def test_sparse_embedding_gradient_gives_the_dense_update(tiny_bert, data):
    """Same dense gradient in the buffer (touched rows only), same clip, same AdamW step as the plain dense recipe."""
    grads = {}
    for sparse in (False, True):
        torch.manual_seed(0)
        model = loading.load_classifier(tiny_bert, ["neg", "pos"], dropout=0.0)
        helper = SparseEmbeddingGrad.install(model) if sparse else None
        input_ids, mask, y = _batch(data, model)
        torch.nn.functional.cross_entropy(model(input_ids=input_ids, attention_mask=mask).logits, y).backward()
        emb = model.get_input_embeddings().weight
        assert emb.grad.layout == torch.strided  # the optimizer always sees a dense gradient
        grads[sparse] = {n: p.grad.clone() for n, p in model.named_parameters()}
        params = [p for p in model.parameters()]
        norm = clip_grad_norm(params, 0.1, helper) if sparse else torch.nn.utils.clip_grad_norm_(params, 0.1)
        grads[(sparse, "norm")] = float(norm)
        grads[(sparse, "clipped")] = emb.grad.clone()
        if sparse:
            rows = helper.rows()
            assert set(rows.tolist()) == set(input_ids.unique().tolist()) - {0}  # [PAD] (id 0) is the padding_idx: no gradient
            helper.zero()
            assert emb.grad is helper.buffer and not helper.buffer.any()
            helper.remove()
            assert model.get_input_embeddings().sparse is False and emb.grad is None
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-5, atol=1e-7, msg=name)
    assert grads[(True, "norm")] == pytest.approx(grads[(False, "norm")], rel=1e-5)
    torch.testing.assert_close(grads[(True, "clipped")], grads[(False, "clipped")], rtol=1e-5, atol=1e-8)


def test_clip_matches_torch_and_leaves_small_gradients_alone():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))
    a.grad, b.grad = torch.randn(5, 3) * 3, torch.randn(4) * 3
    ref = [a.grad.clone(), b.grad.clone()]
    ra, rb = torch.nn.Parameter(a.detach().clone()), torch.nn.Parameter(b.detach().clone())
    ra.grad, rb.grad = ref[0].clone(), ref[1].clone()
    assert float(clip_grad_norm([a, b], 1.0)) == pytest.approx(float(torch.nn.utils.clip_grad_norm_([ra, rb], 1.0)), rel=1e-6)
    torch.testing.assert_close(a.grad, ra.grad) and torch.testing.assert_close(b.grad, rb.grad)
    before = a.grad.clone()
    clip_grad_norm([a, b], 100.0)
    assert torch.equal(a.grad, before)


def test_bf16_copy_feeds_fp32_masters(tiny_bert, data):
    torch.manual_seed(0)
    master = loading.load_classifier(tiny_bert, ["neg", "pos"], dropout=0.0)
    helper = SparseEmbeddingGrad.install(master)
    mp = Bf16Copy(master)
    emb = master.get_input_embeddings().weight
    assert mp.shared == [emb] and mp.compute.get_input_embeddings().weight is emb  # shared fp32, not copied
    assert all(p.dtype == torch.float32 for p in master.parameters())
    assert all(p.dtype == torch.bfloat16 for p in mp.compute_params) and len(mp.compute_params) == len(list(master.parameters())) - 1
    input_ids, mask, y = _batch(data, master)
    logits = mp.compute(input_ids=input_ids, attention_mask=mask).logits
    assert logits.dtype == torch.bfloat16
    torch.nn.functional.cross_entropy(logits.float(), y).backward()
    bf16_grads = [c.grad.float() for c in mp.compute_params]
    mp.step_grads(None, helper)
    for m, g in zip(mp.master_params, bf16_grads):
        assert m.grad.dtype == torch.float32 and torch.equal(m.grad, g)  # bf16 -> fp32 is exact
    assert all(c.grad is None for c in mp.compute_params)  # the next backward writes fresh gradients
    opt = torch.optim.AdamW(master.parameters(), lr=1e-2)
    before = master.classifier.weight.detach().clone()
    opt.step()
    mp.refresh()
    assert not torch.equal(master.classifier.weight, before)
    assert torch.equal(mp.compute.classifier.weight, master.classifier.weight.to(torch.bfloat16))
    mp.close()
    helper.remove()


def test_clipping_through_the_fused_optimizers_grad_scale_equals_scaling_the_gradients(tiny_bert, data):
    """The clip coefficient handed to fused AdamW as grad_scale steps the weights as multiplying every gradient
    (flat buffer, shared sparse embedding) by it first does; the norm returned is torch's clip norm."""
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        master = loading.load_classifier(tiny_bert, ["neg", "pos"], dropout=0.0)
        helper = SparseEmbeddingGrad.install(master)
        mp = Bf16Copy(master)
        input_ids, mask, y = _batch(data, master)
        (torch.nn.functional.cross_entropy(mp.compute(input_ids=input_ids, attention_mask=mask).logits.float(), y) * 50).backward()
        opt = torch.optim.AdamW(master.parameters(), lr=1e-2, fused=fused)
        norm = mp.step_grads(0.5, helper, opt)
        expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.to_dense() if p.grad.is_sparse else p.grad) for p in master.parameters() if p.grad is not None]))
        # fused: the gradients stay as they are (the optimizer divides them); otherwise they were scaled to norm 0.5
        assert float(expected) == pytest.approx(float(norm) if fused else 0.5, rel=1e-5) and float(norm) > 0.5
        assert (getattr(opt, "grad_scale", None) is not None) == fused
        opt.step()
        results.append({k: v.detach().clone() for k, v in master.state_dict().items()})
        mp.close()
        helper.remove()
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("epochs", [1, 3])
def test_training_only_the_used_embedding_rows_gives_adamws_update(tiny_bert, data, monkeypatch, epochs):
    """Only the rows of tokens in the data are trained; every other row gets AdamW's weight decay in one multiply at the
    end. The returned model (best epoch's weights included, whose decay stops at the best epoch's step) matches
    training the whole table, in fp32."""
    from fmtune.training.mixed_precision import EmbeddingRows

    monkeypatch.setattr(EmbeddingRows, "MAX_SHARE", 1.0)  # the tiny vocabulary is mostly in use
    on = _fit(tiny_bert, data, epochs=epochs, weight_decay=0.5)
    off = _fit(tiny_bert, data, epochs=epochs, weight_decay=0.5, embedding_rows=False)
    info = on.levers["embedding_rows"]
    assert off.levers["embedding_rows"] is None and 0 < info["trained_rows"] < info["vocabulary"]
    a, b = on.model.state_dict(), off.model.state_dict()
    assert sorted(a) == sorted(b) and on.best_epoch == off.best_epoch
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    emb = on.model.get_input_embeddings()
    assert type(emb) is torch.nn.Embedding and emb.num_embeddings == info["vocabulary"]
    torch.manual_seed(0)
    initial = loading.load_classifier(tiny_bert, ["neg", "pos"]).get_input_embeddings().weight
    untouched = torch.ones(info["vocabulary"], dtype=torch.bool)
    tok, ids, _ = data
    untouched[torch.tensor(sorted({i for row in ids for i in row} | {tok.pad_token_id}))] = False
    assert not torch.equal(emb.weight[untouched], initial[untouched])  # decayed, not left as they were


def test_embedding_rows_stay_off_where_most_rows_are_used_or_the_embedding_is_frozen(tiny_bert, data):
    from fmtune.training.mixed_precision import EmbeddingRows

    model = loading.load_classifier(tiny_bert, ["neg", "pos"])
    assert EmbeddingRows.install(model, [[list(range(model.get_input_embeddings().num_embeddings))]], [0]) is None
    model.get_input_embeddings().weight.requires_grad_(False)
    assert EmbeddingRows.install(model, [[[1, 2]]], [0]) is None
    model.get_input_embeddings().weight.requires_grad_(True)
    rows = EmbeddingRows.install(model, [[[5, 7], [7, 9]]], [0])
    assert rows.rows.tolist() == [0, 5, 7, 9] and rows.renumber([[9, 5]]) == [[3, 1]]
    assert model.get_input_embeddings().num_embeddings == 4
    rows.uninstall(1.0)
    assert model.get_input_embeddings() is rows.original


def test_bf16_copy_trains_like_autocast_and_returns_fp32(tiny_bert, data):
    a = _fit(tiny_bert, data, bf16="on", bf16_weights=True)
    b = _fit(tiny_bert, data, bf16="on", bf16_weights=False)
    assert a.levers["bf16_weights"].startswith("bf16 copy") and b.levers["bf16_weights"] == "autocast"
    assert all(p.dtype == torch.float32 for p in a.model.parameters())
    assert a.history[-1]["train_loss"] == pytest.approx(b.history[-1]["train_loss"], rel=0.05)
    assert not any(type(m).__name__ == "FastDropout" for m in a.model.modules())


@pytest.mark.parametrize("bf16", ["on", "off"])
def test_crash_then_resume_equals_uninterrupted(tiny_bert, data, tmp_path, bf16, monkeypatch):
    """Every lever on (bf16 copy + fp32 masters when bf16 is on, sparse embedding gradient, trained embedding rows): a
    run stopped after step 5 and resumed from its step-4 checkpoint ends with exactly the weights of an uninterrupted run."""
    from fmtune.training.mixed_precision import EmbeddingRows

    monkeypatch.setattr(EmbeddingRows, "MAX_SHARE", 1.0)  # the tiny vocabulary is mostly in use
    head_lr = 1e-2 if bf16 == "on" else None  # bf16 on: the new head in its own optimizer groups, as `fmtune run` trains it
    whole = _fit(tiny_bert, data, checkpoint_dir=tmp_path / "a", bf16=bf16, checkpoint_every=2, dropout=0.1, head_learning_rate=head_lr)

    class Crash(Exception):
        pass

    steps = []

    def crash(n, row):
        if n:
            steps.append(n)
        if len(steps) == 5:
            raise Crash

    with pytest.raises(Crash):
        _fit(tiny_bert, data, checkpoint_dir=tmp_path / "b", progress=crash, bf16=bf16, checkpoint_every=2, dropout=0.1, head_learning_rate=head_lr)
    resumed = _fit(tiny_bert, data, checkpoint_dir=tmp_path / "b", bf16=bf16, checkpoint_every=2, dropout=0.1, head_learning_rate=head_lr)
    for (k, v), (k2, v2) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert [h["train_loss"] for h in whole.history] == [h["train_loss"] for h in resumed.history]
    assert whole.levers["embedding_rows"] is not None and resumed.levers["embedding_rows"] == whole.levers["embedding_rows"]


def test_resume_with_another_optimizer_layout_stops_with_a_fix(tiny_bert, data, tmp_path):
    from fmtune.errors import FmtuneError

    class Crash(Exception):
        pass

    steps = []

    def crash(n, row):
        steps.extend([n] if n else [])
        if len(steps) == 3:
            raise Crash

    with pytest.raises(Crash):
        _fit(tiny_bert, data, checkpoint_dir=tmp_path, progress=crash, checkpoint_every=1, head_learning_rate=1e-2)
    assert list(tmp_path.glob("step-*"))
    with pytest.raises(FmtuneError, match=r"parameter groups of \[\d+, \d+, 1, 1\] parameters, this run's \[\d+, \d+\].*without --resume"):
        _fit(tiny_bert, data, checkpoint_dir=tmp_path, checkpoint_every=1)


def _tiny_llama(kv_heads: int = 1):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
                         max_position_embeddings=64, tie_word_embeddings=True, attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def test_bf16_copy_keeps_tied_embeddings_tied():
    """A causal LM whose output layer is its input embedding: the copy keeps them one tensor, and its gradient (from both
    uses) reaches the one fp32 master."""
    master = _tiny_llama()
    mp = Bf16Copy(master)
    assert mp.shared == []
    c = mp.compute
    assert c.get_input_embeddings().weight is c.get_output_embeddings().weight
    ids = torch.randint(0, 40, (2, 7))
    c(input_ids=ids, labels=ids).loss.backward()
    expected = c.get_input_embeddings().weight.grad.float()
    mp.step_grads(None)
    assert torch.equal(master.get_input_embeddings().weight.grad, expected)
    mp.close()


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_training_attention_matches_sdpa_with_grouped_heads(kv_heads):
    """fmtune's CPU training attention (eager, for its faster backward) computes what SDPA computes, grouped-query heads
    included: same loss and gradients, with a padded row in the batch."""
    from fmtune.training import fast_dropout

    ids = torch.randint(0, 40, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    out = {}
    for routed in (False, True):
        model = _tiny_llama(kv_heads).train()
        undo = fast_dropout.install(model)[0] if routed else (lambda: None)
        assert (model.config._attn_implementation == fast_dropout.ATTENTION_NAME) == routed
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        out[routed] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
        undo()
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-6)
    for n, g in out[False][1].items():
        torch.testing.assert_close(out[True][1][n], g, rtol=1e-4, atol=1e-6, msg=n)
