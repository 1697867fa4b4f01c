"""Evaluation: fast batched inference (length-sorted, no grad, bf16 where it pays), metrics and bootstrap CIs."""

from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np


def autocast(device, enabled: bool):
    import torch

    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=getattr(device, "type", "cpu"), dtype=torch.bfloat16)


def pad_table(ids: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Every text padded once to the longest: an (N, width) int64 table and the N lengths."""
    lengths = np.fromiter((len(r) for r in ids), dtype=np.int64, count=len(ids))
    table = np.full((len(ids), int(lengths.max(initial=1))), pad_id, dtype=np.int64)
    for j, r in enumerate(ids):
        table[j, : len(r)] = r
    return table, lengths


def batch_tensors(table: np.ndarray, lengths: np.ndarray, idx: np.ndarray, device, pad_to: int | None = None):
    """input_ids and attention_mask of the rows `idx`, cut to their longest text (or padded to `pad_to`)."""
    import torch

    width = pad_to or int(lengths[idx].max())
    rows = table[idx, :width]
    mask = np.arange(width)[None, :] < lengths[idx, None]
    return torch.from_numpy(rows).to(device, non_blocking=True), torch.from_numpy(mask.astype(np.int64)).to(device, non_blocking=True)


def _length_sorted_batches(tokenizer, texts: list[str], max_length: int, batch_size: int, device, ids: list[list[int]] | None = None):
    """Tokenise once (unless the caller already did: `ids`), pad once, then yield (rows, input_ids, attention_mask)
    longest-first, each cut to its longest."""
    if ids is None:
        ids = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    table, lengths = pad_table(ids, pad_id)
    order = np.argsort(-lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield (idx, *batch_tensors(table, lengths, idx, device))


def _in_input_order(model, forward: Callable, tokenizer, texts: list[str], max_length: int, batch_size: int, bf16: bool, progress: Callable | None,
                    ids: list[list[int]] | None = None) -> np.ndarray:
    """Run `forward(input_ids, mask) -> (batch, dim)` over length-sorted batches; rows come back in input order."""
    import torch

    if not texts:
        return np.zeros((0, 0), dtype=np.float32)
    device = next(model.parameters()).device
    out = None
    model.eval()
    with torch.inference_mode(), autocast(device, bf16):
        for idx, input_ids, mask in _length_sorted_batches(tokenizer, texts, max_length, batch_size, device, ids):
            rows = forward(input_ids, mask)
            if out is None:
                out = torch.zeros((len(texts), rows.shape[1]), dtype=torch.float32, device=device)
            out[torch.from_numpy(idx).to(device)] = rows
            if progress:
                progress(len(idx))
    return out.cpu().numpy()


def predict_logits(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 64, bf16: bool = False, progress: Callable | None = None) -> np.ndarray:
    """Logits of a sequence classifier for `texts`, in input order."""

    def forward(input_ids, mask):
        return model(input_ids=input_ids, attention_mask=mask).logits.float()

    return _in_input_order(model, forward, tokenizer, texts, max_length, batch_size, bf16, progress)


def embed(encoder, tokenizer, texts: list[str], max_length: int, batch_size: int = 64, bf16: bool = False, progress: Callable | None = None,
          ids: list[list[int]] | None = None) -> np.ndarray:
    """Mean-pooled, L2-normalised sentence embeddings (the sentence-transformers recipe), in input order. `ids`: the
    texts' token ids (truncated to max_length) when the caller has them already."""
    import torch

    base = getattr(encoder, "base_model", encoder)

    def forward(input_ids, mask):
        hidden = base(input_ids=input_ids, attention_mask=mask).last_hidden_state.float()
        weights = mask.unsqueeze(-1).float()
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return torch.nn.functional.normalize(pooled, dim=-1)

    return _in_input_order(encoder, forward, tokenizer, texts, max_length, batch_size, bf16, progress, ids)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    return float(_macro_f1_batch(y_true[None, :], y_pred[None, :], n_classes)[0])


def _macro_f1_batch(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Macro-F1 for each row of (B, N) label arrays; classes absent from both truth and prediction are skipped."""
    f1s, present = [], []
    for c in range(n_classes):
        t, p = y_true == c, y_pred == c
        tp = (t & p).sum(1)
        denom = t.sum(1) + p.sum(1)
        f1s.append(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0))
        present.append(t.sum(1) > 0)
    f1s, present = np.stack(f1s, 1), np.stack(present, 1)
    return (f1s * present).sum(1) / np.maximum(present.sum(1), 1)


def bootstrap_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """The same resampling for every rung, so CIs (and paired differences) are comparable."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


CLASSIFICATION_METRICS = ("macro_f1", "accuracy")


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str], boot: np.ndarray, primary: str = "macro_f1") -> dict:
    """macro_f1, accuracy, per-class F1, confusion matrix, 95% bootstrap CIs; the bootstrap draws of `primary` are
    returned under _boot_primary for paired comparisons."""
    from sklearn.metrics import confusion_matrix, f1_score

    k = len(labels)
    per_class = f1_score(y_true, y_pred, labels=list(range(k)), average=None, zero_division=0)
    bt, bp = y_true[boot], y_pred[boot]
    boot_f1 = _macro_f1_batch(bt, bp, k)
    boot_acc = (bt == bp).mean(1)
    return {
        "metrics": {"macro_f1": macro_f1(y_true, y_pred, k), "accuracy": float((y_true == y_pred).mean())},
        "ci95": {
            "macro_f1": [float(np.percentile(boot_f1, 2.5)), float(np.percentile(boot_f1, 97.5))],
            "accuracy": [float(np.percentile(boot_acc, 2.5)), float(np.percentile(boot_acc, 97.5))],
        },
        # a class with no test example has no F1 (sklearn's 0.0 would read as "never right")
        "per_class_f1": {lab: (float(f) if (y_true == i).any() else None) for i, (lab, f) in enumerate(zip(labels, per_class))},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=list(range(k))).tolist(),
        "_boot_primary": {"macro_f1": boot_f1, "accuracy": boot_acc}[primary],
    }


def paired_gain_ci(a: np.ndarray, b: np.ndarray) -> list[float]:
    """95% CI of (a - b) from the same bootstrap resamples of both rungs."""
    d = a - b
    return [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))]
