"""Cheaper dropout on CPU: the same training recipe with a faster random-number source.

On a 2-core CPU, torch's dropout spends ~3-5 ns per element drawing Bernoulli numbers from a serial Mersenne Twister;
in a bf16 fine-tune of a small encoder that is the largest single op after the matmuls (~12% of a step), and attention
dropout also forces SDPA off its fused kernel onto the math path. Here the keep-mask comes from numpy's SFC64 generator
(64 random bits give four 16-bit draws, so p is honoured to 1/65536), seeded from torch's generator, so runs stay
reproducible and resumable from the torch RNG state a checkpoint already holds. Masks are ~10x cheaper to make. Inside a
training forward pass of an installed model every dropout call draws from one generator seeded once at the start of
that pass (building a generator costs ~60 us in a training loop, and a MiniLM step has ~20 dropout calls); elsewhere
each call seeds its own.

`install(model)` swaps every `nn.Dropout` for `FastDropout` (same p) and, where the model uses transformers'
AttentionInterface, routes attention through `attention` below (the eager formula with the fast mask while training,
torch's SDPA otherwise; long sequences through `ChunkedAttention`, which never holds a whole T x T layer of scores); it
returns a function that puts the model back exactly as it was. CPU only: on GPUs torch's
Philox dropout is already cheap.
"""

from __future__ import annotations

import functools
import threading
from typing import Callable

import numpy as np
import torch
from torch import nn

from fmtune.models.loading import without_adapter

ATTENTION_NAME = "fmtune_cpu_dropout"


class _Stream(threading.local):
    """The generator of the training forward pass in progress (None outside one), and how many hooked modules' forwards
    are open (a causal LM's training loss calls its decoder, which is hooked as well as the whole model)."""

    generator: np.random.SFC64 | None = None
    depth: int = 0


_STREAM = _Stream()


def _seeded() -> np.random.SFC64:
    """A generator seeded from (and advancing) torch's RNG, which checkpoints save and restore."""
    return np.random.SFC64(int(torch.randint(0, 2**62, (1,))))


def _draws(n: int, generator: np.random.SFC64 | None = None) -> np.ndarray:
    """n uniform 16-bit draws: from `generator`, else the current forward pass's generator, else one seeded for this call."""
    bits = (generator or _STREAM.generator or _seeded()).random_raw((n + 3) // 4)
    return bits.view(np.uint16)[:n]


def _begin_pass(module: nn.Module, args) -> None:
    _STREAM.depth += 1
    if _STREAM.depth == 1 and module.training and torch.is_grad_enabled():
        _STREAM.generator = _seeded()


def _end_pass(module: nn.Module, args, output) -> None:
    _STREAM.depth = max(_STREAM.depth - 1, 0)
    if _STREAM.depth == 0:
        _STREAM.generator = None


def _entry_points(model: nn.Module) -> list[nn.Module]:
    """The model, and its decoder where it has one (causal-LM training runs the decoder and scores only the positions
    it needs, so the whole model's forward is never called there)."""
    base = without_adapter(model)
    try:
        decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    except (AttributeError, NotImplementedError, ValueError):
        decoder = None
    return [model] + ([decoder] if isinstance(decoder, nn.Module) and decoder is not model else [])


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, generator: np.random.SFC64 | None = None) -> torch.Tensor:
    """A bool tensor that is True with probability 1 - p (each element independently, p resolved to 1/65536)."""
    n = int(np.prod(shape))
    return torch.from_numpy(_draws(n, generator) >= round(p * 65536)).view(shape)


@functools.lru_cache(maxsize=64)
def _scale_bits(p: float, dtype: torch.dtype) -> tuple[np.dtype, int | float]:
    """The numpy dtype that holds `dtype`'s bits and the bits of 1 / (1 - p) in `dtype`, rounded as torch's own dropout
    rounds it (its noise tensor, in the input's dtype, is divided by 1 - p)."""
    scale = torch.ones(1, dtype=dtype).div_(1 - p)
    if dtype == torch.float32:
        return np.dtype(np.float32), float(scale)
    if dtype == torch.float64:
        return np.dtype(np.float64), float(scale)
    return np.dtype(np.uint16), int(scale.view(torch.int16).item()) & 0xFFFF  # bf16 / fp16: 16-bit patterns


def multiplier(shape: torch.Size | tuple[int, ...], p: float, dtype: torch.dtype, generator: np.random.SFC64 | None = None) -> torch.Tensor:
    """The dropout noise in `dtype`: 1 / (1 - p) where an element is kept, 0 where it is dropped. One multiply applies
    it (a bool mask would need a promotion and a second multiply for the scale)."""
    n = int(np.prod(shape))
    if dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        return keep_mask(shape, p, generator).to(dtype) * (1.0 / (1.0 - p))
    np_dtype, bits = _scale_bits(p, dtype)
    keep = _draws(n, generator) >= round(p * 65536)
    noise = keep.view(np.uint8) * np_dtype.type(bits)  # 0 or the scale's bits (np.where is ~10x slower here)
    t = torch.from_numpy(noise)
    return (t.view(dtype) if np_dtype == np.uint16 else t).view(shape)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return x * 0.0
    return x * multiplier(x.shape, p, x.dtype)


class FastDropout(nn.Dropout):
    """nn.Dropout with the keep-mask drawn by `keep_mask` on CPU tensors (torch's own dropout elsewhere)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        return dropout(x, self.p, self.training)


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """transformers attention function. Training on CPU: the eager formula (with the fast dropout mask when dropout is
    due), because SDPA's CPU backward is 4-5x slower at fine-tuning's sequence lengths (measured fwd+bwd per layer:
    SmolLM2 batch 16 x 40 tokens 10.9 ms SDPA vs 2.4 ms eager; MiniLM batch 32 x 27 tokens 14.8 ms vs 3.5 ms).
    Everything else (inference, GPUs): torch's SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not (module.training and torch.is_grad_enabled()) or query.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: every key/value head serves `groups` query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    causal = bool(getattr(module, "is_causal", False) and attention_mask is None and query.shape[2] > 1)
    if query.shape[0] * query.shape[1] * query.shape[2] * key.shape[2] > 2 * CHUNK_SCORES:
        out = ChunkedAttention.apply(query, key, value, attention_mask, causal, dropout, scaling)
        return out.transpose(1, 2).contiguous(), None
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    if causal:
        scores = scores.masked_fill(~_causal_mask(query.shape[2], key.shape[2]), torch.finfo(scores.dtype).min)
    # softmax in fp32, as autocast runs it: on CPU a bf16 softmax over short rows is ~5x slower than casting, and less exact
    weights = globals()["dropout"](nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype), dropout)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), None


CHUNK_SCORES = 4 * 1024 * 1024  # attention scores per chunk of ChunkedAttention (16 MB in fp32)


def _causal_mask(queries: int, keys: int) -> torch.Tensor:
    return torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)


class ChunkedAttention(torch.autograd.Function):
    """The eager training attention (scores in the inputs' dtype, masked, softmax in fp32, dropout, weights times values)
    for long sequences, a few batch rows at a time, keeping nothing of size T x T for backward: the backward pass
    recomputes each chunk's scores and draws the same dropout noise again from the chunk's saved seed.

    At 32 texts of 512 tokens the eager formula holds an fp32 softmax, a bf16 copy, the dropout noise and the dropped
    weights of 100M elements per layer (~800 MB, ~5 GB for MiniLM's 6 layers), every one a fresh allocation whose pages
    the kernel must fault in on every step: measured on a 2-core VM, 20 s a step, most of it system time. In chunks of
    CHUNK_SCORES scores the same memory is reused from the heap, at the price of computing the scores twice."""

    @staticmethod
    def forward(ctx, query, key, value, attention_mask, causal: bool, p: float, scaling: float):
        batch, heads, queries, keys = query.shape[0], query.shape[1], query.shape[2], key.shape[2]
        step = max(1, CHUNK_SCORES // (heads * queries * keys))
        chunks = -(-batch // step)
        seeds = [int(s) for s in torch.randint(0, 2**62, (chunks,))] if p > 0 else [None] * chunks  # None: no dropout
        out = torch.empty(batch, heads, queries, value.shape[-1], dtype=value.dtype)
        with torch.no_grad():
            for i, start in enumerate(range(0, batch, step)):
                rows = slice(start, start + step)
                weights, _, _ = ChunkedAttention._weights(query[rows], key[rows], attention_mask, rows, causal, p, scaling, seeds[i])
                torch.matmul(weights, value[rows], out=out[rows])
        ctx.save_for_backward(query, key, value, attention_mask if torch.is_tensor(attention_mask) else None)
        ctx.settings = (causal, p, scaling, step, seeds)
        return out

    @staticmethod
    def _weights(query, key, attention_mask, rows: slice, causal: bool, p: float, scaling: float, seed: int | None):
        """(dropped attention weights in the values' dtype, fp32 softmax, dropout noise or None) for one chunk."""
        scores = torch.matmul(query * scaling, key.transpose(2, 3))  # the scale on the small side
        if torch.is_tensor(attention_mask):
            mask = attention_mask[rows] if attention_mask.shape[0] > 1 else attention_mask
            if mask.dtype != torch.bool:
                scores.add_(mask)
            elif not bool(mask.all()):  # batch rows without padding need no mask
                scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)
        if causal:
            scores.masked_fill_(~_causal_mask(query.shape[2], key.shape[2]), torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        del scores
        weights = probs.to(query.dtype, copy=query.dtype == torch.float32)  # fp32 inputs: not the softmax itself, which backward needs
        noise = multiplier(weights.shape, p, weights.dtype, np.random.SFC64(seed)) if seed is not None else None
        if noise is not None:
            weights.mul_(noise)
        return weights, probs, noise

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, attention_mask = ctx.saved_tensors
        causal, p, scaling, step, seeds = ctx.settings
        grad_q, grad_k, grad_v = (torch.empty(t.shape, dtype=t.dtype) for t in (query, key, value))
        for i, start in enumerate(range(0, query.shape[0], step)):
            rows = slice(start, start + step)
            q, k, v, g = query[rows], key[rows], value[rows], grad_out[rows]
            weights, probs, noise = ChunkedAttention._weights(q, k, attention_mask, rows, causal, p, scaling, seeds[i])
            torch.matmul(weights.transpose(2, 3), g, out=grad_v[rows])
            del weights
            grad_w = torch.matmul(g, v.transpose(2, 3))
            if noise is not None:
                grad_w.mul_(noise)
            del noise
            grad_p = grad_w.float()
            del grad_w
            # softmax backward in fp32, then the masked positions (probability 0) get 0, as masked_fill's backward gives them
            grad_p.sub_((grad_p * probs).sum(-1, keepdim=True)).mul_(probs)
            grad_scores = grad_p.to(q.dtype)
            del grad_p, probs
            torch.matmul(grad_scores, k, out=grad_q[rows]).mul_(scaling)
            torch.matmul(grad_scores.transpose(2, 3), q * scaling, out=grad_k[rows])
        return grad_q, grad_k, grad_v, None, None, None, None


def _register_attention() -> bool:
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    AttentionInterface.register(ATTENTION_NAME, attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # the same masks SDPA gets (else transformers builds none)
    return True


def install(model: nn.Module) -> tuple[Callable[[], None], dict]:
    """Use the fast dropout in `model` (CPU); returns (undo, what was swapped)."""
    swapped: list[tuple[nn.Module, str, nn.Dropout]] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout and child.p > 0:
                fast = FastDropout(child.p, child.inplace)
                fast.train(child.training)
                setattr(parent, name, fast)
                swapped.append((parent, name, child))
    # gradient checkpointing re-runs parts of the forward in backward and replays torch's RNG state to get the same
    # masks: that only works with one seed per call, so such models keep per-call seeding
    checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    hooks = [] if checkpointing else [h for m in _entry_points(model) for h in (m.register_forward_pre_hook(_begin_pass), m.register_forward_hook(_end_pass, always_call=True))]
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    routed = False
    if previous in ("sdpa", "eager") and hasattr(model, "set_attn_implementation") and _register_attention():
        try:
            model.set_attn_implementation(ATTENTION_NAME)
            routed = getattr(model.config, "_attn_implementation", None) == ATTENTION_NAME
        except (ValueError, KeyError, TypeError, AttributeError):
            routed = False

    def undo() -> None:
        for hook in hooks:
            hook.remove()
        _STREAM.generator, _STREAM.depth = None, 0
        for parent, name, original in swapped:
            original.train(getattr(parent, name).training)
            setattr(parent, name, original)
        if routed:
            model.set_attn_implementation(previous)

    return undo, {"dropout_modules": len(swapped), "attention": ATTENTION_NAME if routed else previous,
                  "chunked_attention_above_scores": 2 * CHUNK_SCORES if routed else None}
