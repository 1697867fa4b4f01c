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

import math
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
    learned: bool | None = None  # the returned epoch's training loss clearly below chance (None: not known for this task)
    selection: dict | None = None  # how the returned epoch was chosen, on how many validation examples, and how noisy that was


VAL_PER_CLASS_FOR_METRIC = 30  # smallest validation class at which its macro-F1 is steady enough to select epochs on
MIN_STEPS_BEFORE_STOPPING = 30  # early stopping cannot end a rung before about this many optimizer steps


RULE_NAMES = {"metric": "validation macro-F1", "loss": "validation loss", "calibrated": "calibrated validation loss"}


def selection_rule(val_y: np.ndarray, n_classes: int) -> tuple[str, str]:
    """What picks the best epoch and ends training: validation macro-F1 when every class has VAL_PER_CLASS_FOR_METRIC
    validation texts, else the validation loss. Macro-F1 of a few dozen texts moves by +-0.1 from noise alone (a
    3-class set with 60 validation texts stopped at an epoch whose training loss was still ln 3), while the loss
    averages a continuous score over every text."""
    counts = np.bincount(np.asarray(val_y, dtype=np.int64), minlength=n_classes)
    smallest = int(counts.min()) if len(counts) else 0
    if smallest >= VAL_PER_CLASS_FOR_METRIC:
        return "metric", (f"validation macro-F1 (every class has at least {VAL_PER_CLASS_FOR_METRIC} validation texts; the smallest has {smallest}); "
                          "within --min-delta the lower validation loss wins")
    return "calibrated", (f"calibrated validation loss: the smallest class has {smallest} validation texts (fewer than {VAL_PER_CLASS_FOR_METRIC}), "
                          "too few for a steady macro-F1, so epochs are compared on the validation cross-entropy after fitting one temperature "
                          "to each epoch's logits: averaged over every text, and not raised by confidence alone as the raw loss is")


def chance_loss(y: np.ndarray, n_classes: int, class_weight: np.ndarray | None) -> float:
    """The training loss of a model that ignores its input: the entropy of the class prior as the (weighted) loss sees it."""
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=n_classes).astype(float)
    mass = counts * (class_weight if class_weight is not None else 1.0)
    p = mass[mass > 0] / mass.sum()
    return float(-(p * np.log(p)).sum())


def min_epochs(n_train: int, batch_size: int, epochs: int) -> int:
    """The first epoch at which early stopping may end training: about MIN_STEPS_BEFORE_STOPPING steps (at least 2 epochs)."""
    return min(epochs, max(2, math.ceil(MIN_STEPS_BEFORE_STOPPING / max(math.ceil(n_train / batch_size), 1))))


def selection_noise(y: np.ndarray, pred: np.ndarray, n_classes: int, seed: int, resamples: int = 1000) -> tuple[float, list[float]]:
    """Validation macro-F1 of the returned model and its 95% bootstrap interval: how much the epoch choice could move from noise."""
    from fmtune.evidence.evaluate import _macro_f1_batch, bootstrap_indices, macro_f1

    if len(y) == 0:
        return float("nan"), [float("nan"), float("nan")]
    boot = bootstrap_indices(len(y), resamples, seed)
    draws = _macro_f1_batch(y[boot], pred[boot], n_classes)
    return macro_f1(y, pred, n_classes), [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))]


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


def evaluate_split(model, ids: list[list[int]], y: np.ndarray, pad_id: int, batch_size: int, bf16: bool, class_weight=None, with_logits: bool = False):
    """Mean loss and predictions on a tokenised split (length-sorted batches, inference_mode, one host copy at the end);
    with `with_logits`, the (N, classes) float32 logits too."""
    import torch

    from fmtune.evidence.evaluate import autocast

    if not ids:
        return (0.0, np.zeros(0, dtype=np.int64)) + ((np.zeros((0, 0), dtype=np.float32),) if with_logits else ())
    device = next(model.parameters()).device
    table, lengths = pad_table(ids, pad_id)
    order = np.argsort(lengths, kind="stable")
    target = torch.as_tensor(y, dtype=torch.long, device=device)
    preds = torch.zeros(len(ids), dtype=torch.long, device=device)
    kept = [None] * len(order) if with_logits else None
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
            if kept is not None:
                kept[start // batch_size] = (idx, logits)
    model.train(was_training)
    if kept is None:
        return float(total) / len(ids), preds.cpu().numpy()
    out = np.zeros((len(ids), kept[0][1].shape[-1]), dtype=np.float32)
    for idx, logits in filter(None, kept):
        out[idx] = logits.cpu().numpy()
    return float(total) / len(ids), preds.cpu().numpy(), out


def calibrated_loss(logits: np.ndarray, y: np.ndarray, class_weight: np.ndarray | None = None) -> tuple[float, float]:
    """(cross-entropy after dividing the logits by the one temperature that minimises it, that temperature). A proper
    score of how well the logits rank the classes that, unlike the raw loss, does not rise merely because a model grows
    more confident while its decisions still improve; averaged over every text, so far steadier than a macro-F1 of a
    few dozen decisions. Weighted by the class weights, as the training loss is."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    y = np.asarray(y, dtype=np.int64)
    w = np.ones(len(y)) if class_weight is None else np.asarray(class_weight, dtype=np.float64)[y]
    z = logits.astype(np.float64)

    def loss(log_t: float) -> float:
        return float(-(log_softmax(z / np.exp(log_t), axis=1)[np.arange(len(y)), y] * w).sum() / w.sum())

    best = minimize_scalar(loss, bounds=(-4.0, 4.0), method="bounded", options={"xatol": 1e-3})
    return float(best.fun), float(np.exp(best.x))


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
    rule, rule_why = selection_rule(val_y, n_classes)
    task = _classifier_task(model, cfg, (table, lengths, pad_to, np.asarray(train_y)), (val_ids, val_y, pad_id), n_classes, class_weight, eval_batch_size, bf16, world, rule)
    run = loop.train(model, task, cfg, seed=seed, learning_rate=learning_rate, bf16=bf16, world=world, checkpoint_dir=checkpoint_dir, progress=progress,
                     head=head, head_learning_rate=head_learning_rate)
    if rows is not None:  # the untrained rows decayed as AdamW would have decayed them up to the returned weights' step
        rows.uninstall(weight_decay_product(learning_rate, run.lr_lambda, cfg.weight_decay, run.returned_step))
    model, adapter = loop.finish(run.model, lora)
    _, val_pred = evaluate_split(model, validation[0], val_y, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0, eval_batch_size, bf16)
    value, ci = selection_noise(np.asarray(val_y), val_pred, n_classes, seed)
    selection = {"rule": task.metric, "why": rule_why, "validation_examples": int(len(val_y)), "smallest_validation_class": int(np.bincount(np.asarray(val_y, dtype=np.int64), minlength=n_classes).min()),
                 "validation_macro_f1": round(value, 4), "validation_macro_f1_ci95": [round(c, 4) for c in ci], "min_epochs": task.min_epochs,
                 "chance_loss": None if task.chance_loss is None else round(task.chance_loss, 4)}
    return TrainResult(model, run.history, run.best_epoch, len(run.history), run.steps, run.seconds, run.stopped, _levers(run, model, cfg, rows, pad_to, lora), adapter, run.real_tokens,
                       run.learned, selection)


def _classifier_task(model, cfg: TrainConfig, batches: tuple, validation: tuple, n_classes: int, class_weight: np.ndarray | None, eval_batch_size: int,
                     bf16: bool, world: World, rule: str = "metric") -> loop.Task:
    """Cross-entropy on the label (class-weighted when asked) over slices of the padded table; selected on validation
    macro-F1 (rule "metric": a tie within --min-delta goes to the lower validation loss), the calibrated validation loss
    ("calibrated", see calibrated_loss) or the validation loss ("loss")."""
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
        val_loss, val_pred, logits = evaluate_split(runner, val_ids, val_y, pad_id, eval_batch_size, bf16, class_weight, with_logits=True)
        val_f1 = macro_f1(val_y, val_pred, n_classes)
        fields = {"val_loss": round(val_loss, 5), "val_macro_f1": round(val_f1, 5)}
        if rule == "calibrated":
            calibrated, temperature = calibrated_loss(logits, val_y, class_weight)
            fields.update(val_calibrated_loss=round(calibrated, 5), val_temperature=round(temperature, 3))
            return fields, (-calibrated, val_loss)
        return fields, ((val_f1 if rule == "metric" else -val_loss), val_loss)

    by_metric = rule == "metric"
    return loop.Task(lengths, loss, lambda total: float(total) / len(train_y), validate, RULE_NAMES[rule],
                     cfg.min_delta if by_metric else 0.0, chance_loss=chance_loss(train_y, n_classes, class_weight),
                     min_epochs=min_epochs(len(train_y), cfg.batch_size, cfg.epochs), sparse_embedding=True, compile=bool(getattr(cfg, "compile", False)))


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
