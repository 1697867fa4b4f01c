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
torch's SDPA otherwise); it returns a function that puts the model back exactly as it was. CPU only: on GPUs torch's
Philox dropout is already cheap.
"""

from __future__ import annotations

import functools
import threading
from typing import Callable

import numpy as np
import torch
from torch import nn

from fmtune.models import without_adapter

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


def _draws(n: int) -> np.ndarray:
    """n uniform 16-bit draws: from the current forward pass's generator, or from one seeded for this call."""
    bits = (_STREAM.generator or _seeded()).random_raw((n + 3) // 4)
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


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """A bool tensor that is True with probability 1 - p (each element independently, p resolved to 1/65536)."""
    n = int(np.prod(shape))
    return torch.from_numpy(_draws(n) >= round(p * 65536)).view(shape)


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


def multiplier(shape: torch.Size | tuple[int, ...], p: float, dtype: torch.dtype) -> torch.Tensor:
    """The dropout noise in `dtype`: 1 / (1 - p) where an element is kept, 0 where it is dropped. One multiply applies
    it (a bool mask would need a promotion and a second multiply for the scale)."""
    n = int(np.prod(shape))
    if dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        return keep_mask(shape, p).to(dtype) * (1.0 / (1.0 - p))
    np_dtype, bits = _scale_bits(p, dtype)
    keep = _draws(n) >= round(p * 65536)
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
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    if getattr(module, "is_causal", False) and attention_mask is None and query.shape[2] > 1:
        causal = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool).tril(key.shape[2] - query.shape[2])
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    # softmax in fp32, as autocast runs it: on CPU a bf16 softmax over short rows is ~5x slower than casting, and less exact
    weights = globals()["dropout"](nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype), dropout)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), None


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

    return undo, {"dropout_modules": len(swapped), "attention": ATTENTION_NAME if routed else previous}
