"""Fine-tuning (full or LoRA) and from-scratch training of a sequence classifier.

The fast path, each lever recorded in TrainResult.levers and each one switchable from TrainConfig:
texts tokenised once and padded once into one table (a batch is a slice of it, cut to its longest text: dynamic
padding without per-batch Python padding); length-bucketed batches; bf16 autocast where it pays (fp32 master
weights, fp32 loss); fused AdamW; no per-step host syncs (the loss is summed on device, read once per epoch);
optional torch.compile; evaluation under inference_mode in length-sorted batches; validation-based early stopping
with best-epoch selection. The loop itself (precision, optimizer, schedule, early stopping, checkpoints, DDP/FSDP) is
fmtune.training.loop's, shared with the causal LMs; this module brings the classifier's batches, loss and validation score.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fmtune.config import TrainConfig
from fmtune.evidence.evaluate import batch_tensors, pad_table  # the batching the loop and evaluation share
from fmtune.training import loop, threads
from fmtune.training.distributed import World
from fmtune.training.loop import BestWeights, length_batches  # noqa: F401 (part of this module's interface)


@dataclass
class TrainResult:
    model: Any  # best-epoch weights loaded; LoRA merged into a plain transformers model
    history: list[dict]
    best_epoch: int
    epochs_run: int
    steps: int
    train_seconds: float
    stopped: str  # why training ended, in words
    levers: dict = field(default_factory=dict)
    adapter: dict | None = None  # LoRA only: {"config": LoraConfig, "state": adapter tensors}, saved beside the merged model
    real_tokens: int = 0  # non-pad tokens trained on (all epochs), for throughput and model-FLOPs utilisation


def token_ids(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]


def class_weight_vector(y: np.ndarray, n_classes: int, mode: str) -> tuple[np.ndarray | None, str]:
    """Balanced loss weights when asked, or (auto) when the largest class is over 1.5x the smallest."""
    counts = np.bincount(y, minlength=n_classes).astype(float)
    ratio = counts.max() / max(counts.min(), 1.0)
    if mode == "none" or (mode == "auto" and ratio <= 1.5):
        why = "turned off (--class-weights none)" if mode == "none" else f"largest class is {ratio:.2f}x the smallest (threshold 1.5): plain loss"
        return None, why
    weights = counts.sum() / (n_classes * np.maximum(counts, 1.0))
    why = f"largest class is {ratio:.2f}x the smallest: balanced class weights (n / (k * count))" if mode == "auto" else "balanced (--class-weights balanced)"
    return weights, why


def evaluate_split(model, ids: list[list[int]], y: np.ndarray, pad_id: int, batch_size: int, bf16: bool, class_weight=None) -> tuple[float, np.ndarray]:
    """Mean loss and predictions on a tokenised split (length-sorted batches, inference_mode, one host copy at the end)."""
    import torch

    from fmtune.evidence.evaluate import autocast

    if not ids:
        return 0.0, np.zeros(0, dtype=np.int64)
    device = next(model.parameters()).device
    table, lengths = pad_table(ids, pad_id)
    order = np.argsort(lengths, kind="stable")
    target = torch.as_tensor(y, dtype=torch.long, device=device)
    preds = torch.zeros(len(ids), dtype=torch.long, device=device)
    total = torch.zeros((), device=device)
    weight = torch.as_tensor(class_weight, dtype=torch.float32, device=device) if class_weight is not None else None
    was_training = model.training
    model.eval()
    with torch.inference_mode(), autocast(device, bf16):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            input_ids, mask = batch_tensors(table, lengths, idx, device)
            logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
            rows = torch.from_numpy(idx).to(device)
            total += torch.nn.functional.cross_entropy(logits, target[rows], weight=weight, reduction="sum")
            preds[rows] = logits.argmax(-1)
    model.train(was_training)
    return float(total) / len(ids), preds.cpu().numpy()


def _dropout(model) -> float | None:
    config = getattr(model, "config", None)
    for key in ("hidden_dropout_prob", "dropout"):
        if hasattr(config, key):
            return float(getattr(config, key))
    return None


def weight_decay_product(learning_rate: float, lr_lambda: Callable[[int], float], weight_decay: float, steps: int) -> float:
    """prod over steps t < `steps` of (1 - lr_t * weight_decay): what AdamW's decoupled weight decay alone does to a
    weight whose gradient stayed zero (lr_t = learning_rate * lr_lambda(t), the schedule's rate at step t)."""
    product = 1.0
    for t in range(steps):
        product *= 1.0 - learning_rate * lr_lambda(t) * weight_decay
    return product




def fit(
    model,
    tokenizer,
    train: tuple[list[list[int]], np.ndarray],
    validation: tuple[list[list[int]], np.ndarray],
    cfg: TrainConfig,
    *,
    learning_rate: float,
    n_classes: int,
    seed: int,
    bf16: bool,
    lora: bool = False,
    class_weight: np.ndarray | None = None,
    eval_batch_size: int = 64,
    progress: Callable[[int, dict], None] | None = None,
    checkpoint_dir: Path | None = None,
    world: World | None = None,
    head: frozenset[str] = frozenset(),
    head_learning_rate: float | None = None,
) -> TrainResult:
    """Train `model` with early stopping on validation macro-F1; returns the best epoch's weights.

    Levers read from `cfg`: bf16 is decided by the caller (`bf16`); `length_bucketing`; `compile` (torch.compile of
    the forward pass, off unless set: on CPU its compile time outweighs the gain at fmtune's data sizes).

    With `checkpoint_dir`, a checkpoint (weights, optimizer, scheduler, RNG states, data position, early-stopping state)
    is written as checkpoint.Policy says (--checkpoint-every, else --checkpoint-seconds), and training resumes from the
    newest one, mid-epoch included, giving the same result as an uninterrupted run. Under torchrun (`world.size > 1`)
    each rank trains on its slice of every global batch inside DDP; only rank 0 writes checkpoints."""
    from fmtune.training.mixed_precision import EmbeddingRows

    model = loop.start(model, cfg, seed, lora, "SEQ_CLS")
    world = world or World()
    train_ids, train_y = train
    val_ids, val_y = validation
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    table, lengths = pad_table(train_ids, pad_id)
    # only the embedding rows the data's tokens use are trained; the rest get AdamW's weight decay once, at the end
    rows = EmbeddingRows.install(model, [train_ids, val_ids], [pad_id]) if getattr(cfg, "embedding_rows", True) and not world.distributed and not lora else None
    if rows is not None:
        table, val_ids, pad_id = rows.renumber(table), rows.renumber(val_ids), int(rows.lookup[pad_id])
    pad_to = None if getattr(cfg, "dynamic_padding", True) else int(lengths.max(initial=1))
    task = _classifier_task(model, cfg, (table, lengths, pad_to, np.asarray(train_y)), (val_ids, val_y, pad_id), n_classes, class_weight, eval_batch_size, bf16, world)
    run = loop.train(model, task, cfg, seed=seed, learning_rate=learning_rate, bf16=bf16, world=world, checkpoint_dir=checkpoint_dir, progress=progress,
                     head=head, head_learning_rate=head_learning_rate)
    if rows is not None:  # the untrained rows decayed as AdamW would have decayed them up to the returned weights' step
        rows.uninstall(weight_decay_product(learning_rate, run.lr_lambda, cfg.weight_decay, run.returned_step))
    model, adapter = loop.finish(run.model, lora)
    return TrainResult(model, run.history, run.best_epoch, len(run.history), run.steps, run.seconds, run.stopped, _levers(run, model, cfg, rows, pad_to, lora), adapter, run.real_tokens)


def _classifier_task(model, cfg: TrainConfig, batches: tuple, validation: tuple, n_classes: int, class_weight: np.ndarray | None, eval_batch_size: int,
                     bf16: bool, world: World) -> loop.Task:
    """Cross-entropy on the label (class-weighted when asked) over slices of the padded table; validation macro-F1, a
    tie within --min-delta going to the lower validation loss."""
    import torch

    from fmtune.evidence.evaluate import macro_f1
    from fmtune.training.distributed import zero_loss

    table, lengths, pad_to, train_y = batches
    val_ids, val_y, pad_id = validation
    device = next(model.parameters()).device
    targets = torch.as_tensor(train_y, dtype=torch.long, device=device)
    weight = torch.as_tensor(class_weight, dtype=torch.float32, device=device) if class_weight is not None else None

    def loss(forward, idx: np.ndarray, local: np.ndarray):
        target = targets[torch.from_numpy(local).to(device)]
        denominator = weight[targets[torch.from_numpy(idx).to(device)]].sum() if weight is not None else float(len(idx))
        if len(local):
            input_ids, mask = batch_tensors(table, lengths, local, device, pad_to)
            logits = forward(input_ids=input_ids, attention_mask=mask).logits
            # the sum over this rank's slice of the global batch, scaled so DDP's gradient average is the global mean
            losses = torch.nn.functional.cross_entropy(logits.float(), target, weight=weight, reduction="sum")
            scaled = losses / denominator * world.size
        else:  # a global batch smaller than the number of ranks: take part in the gradient average with zero
            losses = scaled = zero_loss(forward, *batch_tensors(table, lengths, idx[:1], device, pad_to))
        return scaled, losses.detach() * (len(idx) / denominator if weight is not None else 1.0)

    def validate(runner):
        val_loss, val_pred = evaluate_split(runner, val_ids, val_y, pad_id, eval_batch_size, bf16, class_weight)
        val_f1 = macro_f1(val_y, val_pred, n_classes)
        return {"val_loss": round(val_loss, 5), "val_macro_f1": round(val_f1, 5)}, (val_f1, val_loss)

    return loop.Task(lengths, loss, lambda total: float(total) / len(train_y), validate, "validation macro-F1", cfg.min_delta,
                     sparse_embedding=True, compile=bool(getattr(cfg, "compile", False)))


def _levers(run: loop.Outcome, model, cfg: TrainConfig, rows, pad_to: int | None, lora: bool) -> dict:
    import torch

    shared = run.levers
    return {
        "bf16": shared["bf16"],
        "bf16_weights": shared["bf16_weights"],
        "sparse_embedding_grad": shared["sparse_embedding_grad"],
        "embedding_rows": rows.info() if rows is not None else None,
        "malloc_trim_every": shared["malloc_trim_every"],
        "length_bucketing": cfg.length_bucketing,
        "dynamic_padding": pad_to is None,
        "fused_optimizer": shared["fused_optimizer"],
        "fused_step": shared["fused_step"],
        "torch_compile": shared["torch_compile"],
        "dropout": _dropout(model),
        "fast_dropout": shared["fast_dropout"],
        "attention": getattr(getattr(model, "config", None), "_attn_implementation", None),
        "threads": torch.get_num_threads() if next(model.parameters()).device.type == "cpu" else None,
        "omp_wait": threads.choice(),
        "inference_mode_eval": True,
        "lora": lora,
    }
