"""The fast CPU dropout: right probabilities and scaling, reproducible from torch's seed, and a model put back exactly."""

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from fmtune.training import fast_dropout


def tiny_bert(dropout: float = 0.1):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, max_position_embeddings=32,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, num_labels=2, attn_implementation="sdpa")
    return BertForSequenceClassification(config)


def batch():
    ids = torch.tensor([[2, 5, 7, 9, 11, 3], [2, 6, 8, 3, 0, 0]])
    return ids, (ids != 0).long()


def test_keep_mask_rate_and_scaling():
    torch.manual_seed(0)
    x = torch.ones(400_000)
    y = fast_dropout.dropout(x, 0.3)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.3) < 0.005
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.7))
    assert abs(y.mean().item() - 1.0) < 0.01
    assert torch.equal(fast_dropout.dropout(x, 0.3, training=False), x)
    assert torch.equal(fast_dropout.dropout(x, 1.0), torch.zeros_like(x))


def test_masks_follow_torch_seed():
    x = torch.ones(1000)
    torch.manual_seed(7)
    a = fast_dropout.dropout(x, 0.5)
    torch.manual_seed(7)
    b = fast_dropout.dropout(x, 0.5)
    c = fast_dropout.dropout(x, 0.5)
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_gradient_is_mask_times_scale():
    torch.manual_seed(1)
    x = torch.randn(64, 8, requires_grad=True)
    y = fast_dropout.dropout(x, 0.25)
    y.sum().backward()
    kept = y.detach() != 0
    assert torch.allclose(x.grad, kept.float() / 0.75)


def test_install_swaps_and_undo_restores():
    model = tiny_bert()
    ids, mask = batch()
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    undo, info = fast_dropout.install(model)
    assert info["dropout_modules"] > 0 and info["attention"] == fast_dropout.ATTENTION_NAME
    assert any(isinstance(m, fast_dropout.FastDropout) for m in model.modules())
    with torch.no_grad():  # eval: no dropout, SDPA with the same padding mask
        during = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(before, during, atol=1e-6)
    model.train()
    model(input_ids=ids, attention_mask=mask).logits.sum().backward()  # training path runs and has gradients
    assert model.classifier.weight.grad is not None
    undo()
    assert not any(isinstance(m, fast_dropout.FastDropout) for m in model.modules())
    assert model.config._attn_implementation == "sdpa"
    model.eval()
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)


def test_training_attention_matches_sdpa_without_dropout():
    """With a vanishing attention-dropout p, the eager formula used in training equals SDPA (padding mask included)."""
    model = tiny_bert(dropout=0.0)
    ids, mask = batch()
    model.train()
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
    fast_dropout.install(model)
    for module in model.modules():
        if type(module).__name__.endswith("SelfAttention"):
            module.dropout.p = 1e-12
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(reference, got, atol=1e-5)


def test_one_generator_per_training_forward_reproducible_from_torch_seed():
    """Inside an installed model's training forward, the dropout calls share one generator seeded from torch's RNG at
    the start of the pass: the same torch seed gives the same outputs, the pass advances torch's RNG once, and after
    the pass (or an exception inside it) calls seed their own generator again."""
    model = tiny_bert()
    ids, mask = batch()
    undo, _ = fast_dropout.install(model)
    model.train()
    torch.manual_seed(3)
    a = model(input_ids=ids, attention_mask=mask).logits
    after_pass = torch.get_rng_state()
    torch.manual_seed(3)
    b = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, b) and torch.equal(after_pass, torch.get_rng_state())
    torch.manual_seed(3)
    torch.randint(0, 2**62, (1,))
    assert torch.equal(after_pass, torch.get_rng_state())  # one seed drawn for the whole pass
    c = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.equal(a, c)
    assert fast_dropout._STREAM.generator is None
    with pytest.raises(IndexError):  # a token id past the vocabulary fails inside the pass
        model(input_ids=torch.full_like(ids, 999), attention_mask=mask)
    assert fast_dropout._STREAM.generator is None
    undo()
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_gradient_checkpointing_keeps_per_call_seeding():
    """Checkpointed segments are re-run in backward with torch's RNG state replayed, which reproduces per-call seeds
    only: with gradient checkpointing on, no per-pass generator is installed, and the gradients equal those of a plain
    run seeded per call (the masks drawn in backward's re-run are the forward's)."""
    def grads(checkpointing: bool):
        model = tiny_bert()
        if checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; gradient_checkpointing_enable is its deprecated alias
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        fast_dropout.install(model)
        assert bool(model._forward_pre_hooks) != checkpointing
        for module in model.modules():  # the plain run seeded per call too
            module._forward_pre_hooks.clear()
            module._forward_hooks.clear()
        model.train()
        ids, mask = batch()
        torch.manual_seed(5)
        model(input_ids=ids, attention_mask=mask).logits.sum().backward()
        return model.bert.encoder.layer[0].attention.self.query.weight.grad

    plain, checkpointed = grads(False), grads(True)
    assert checkpointed.abs().sum() > 0 and torch.allclose(plain, checkpointed, rtol=1e-5, atol=1e-12)


def _eager_reference(q, k, v, mask, causal, scaling, noises):
    """The unchunked eager formula with autograd, applying the given dropout noise per chunk of batch rows."""
    scores = torch.matmul(q * scaling, k.transpose(2, 3))
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    if causal:
        scores = scores.masked_fill(~fast_dropout._causal_mask(q.shape[2], k.shape[2]), torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if noises:
        weights = weights * torch.cat(noises)
    return torch.matmul(weights, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p, causal", [(0.0, False), (0.2, False), (0.2, True)])
def test_chunked_attention_matches_the_eager_formula_in_values_and_gradients(monkeypatch, dtype, p, causal):
    """Chunks of 2 batch rows (5 rows, so the last chunk is short), padding in some rows, dropout noise redrawn in
    backward from each chunk's seed: the same outputs and q/k/v gradients as the eager formula with that noise."""
    batch, heads, length, dim = 5, 3, 7, 4
    monkeypatch.setattr(fast_dropout, "CHUNK_SCORES", 2 * heads * length * length)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(batch, heads, length, dim, generator=gen).to(dtype).requires_grad_() for _ in range(3))
    lengths = torch.tensor([7, 4, 7, 2, 6])
    mask = None if causal else (torch.arange(length)[None, :] < lengths[:, None])[:, None, None, :].expand(batch, 1, length, length)
    grad_out = torch.randn(batch, heads, length, dim, generator=gen).to(dtype)
    scaling = dim**-0.5

    torch.manual_seed(3)
    out = fast_dropout.ChunkedAttention.apply(q, k, v, mask, causal, p, scaling)
    out.backward(grad_out)
    chunked = [out.detach(), q.grad, k.grad, v.grad]
    torch.manual_seed(3)  # the same seeds, drawn as forward draws them
    seeds = [int(s) for s in torch.randint(0, 2**62, (3,))] if p > 0 else []
    import numpy as np

    noises = [fast_dropout.multiplier((min(2, batch - 2 * i), heads, length, length), p, dtype, np.random.SFC64(s)) for i, s in enumerate(seeds)]
    for t in (q, k, v):
        t.grad = None
    ref = _eager_reference(q, k, v, mask, causal, scaling, noises)
    ref.backward(grad_out)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for name, a, b in zip(("out", "dq", "dk", "dv"), chunked, [ref.detach(), q.grad, k.grad, v.grad]):
        torch.testing.assert_close(a, b, **tol, msg=name)
    if p > 0:
        assert (torch.cat(noises) == 0).any() and (torch.cat(noises) != 0).any()


def test_long_sequences_route_through_the_chunked_attention(monkeypatch):
    """Above the size limit the training attention takes the chunked path; below it, the eager formula; both agree."""
    model = tiny_bert(dropout=0.0)
    undo, info = fast_dropout.install(model)
    assert info["attention"] == fast_dropout.ATTENTION_NAME
    model.train()
    ids, mask = batch()
    calls = []
    original = fast_dropout.ChunkedAttention.apply
    monkeypatch.setattr(fast_dropout.ChunkedAttention, "apply", lambda *a: calls.append(1) or original(*a))
    small = model(input_ids=ids, attention_mask=mask).logits
    assert not calls
    monkeypatch.setattr(fast_dropout, "CHUNK_SCORES", 1)
    chunked = model(input_ids=ids, attention_mask=mask).logits
    assert len(calls) == 2  # one per layer
    torch.testing.assert_close(small, chunked, rtol=1e-5, atol=1e-6)
    undo()
