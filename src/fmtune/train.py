"""Fine-tuning (full or LoRA) and from-scratch training of a sequence classifier.

The fast path, each lever recorded in TrainResult.levers and each one switchable from TrainConfig:
texts tokenised once and padded once into one table (a batch is a slice of it, cut to its longest text: dynamic
padding without per-batch Python padding); length-bucketed batches; bf16 autocast where it pays (fp32 master
weights, fp32 loss); fused AdamW; no per-step host syncs (the loss is summed on device, read once per epoch);
optional torch.compile; evaluation under inference_mode in length-sorted batches; validation-based early stopping
with best-epoch selection.
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fmtune import checkpoint, threads
from fmtune.evaluate import batch_tensors, pad_table  # the batching the loop and evaluation share
from fmtune.config import TrainConfig
from fmtune.distributed import World, all_sum, shard, sharded, unwrap, wrap, zero_loss
from fmtune.models import with_lora


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


def length_batches(lengths: list[int], batch_size: int, rng: np.random.Generator, bucketing: bool) -> list[np.ndarray]:
    """Shuffled batches; with bucketing, texts of similar length share a batch (chunks of 50 batches sorted by length)."""
    order = rng.permutation(len(lengths))
    if not bucketing:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    lengths = np.asarray(lengths)
    chunk = batch_size * 50
    batches = []
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


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

    from fmtune.evaluate import autocast

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


BEST_IN_MEMORY_BYTES = 256 << 20  # best weights up to this size (and 5% of RAM) stay in memory; larger ones go to a file


def _memory_limit() -> int:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return BEST_IN_MEMORY_BYTES
    return min(BEST_IN_MEMORY_BYTES, total // 20)


class BestWeights:
    """The best epoch's weights so far. A small model's copy stays in memory: writing it at every improving epoch
    wrote the model's size to disk again and again (MiniLM: 90 MB an epoch). A large one is parked in a safetensors
    file (streamed: no second in-RAM copy while it is written), which a checkpoint then links instead of rewriting.
    Always in memory when the model is sharded (FSDP: each rank holds its own shards) or the disk cannot take it."""

    def __init__(self, checkpoint_dir: Path | None, in_memory: bool) -> None:
        import shutil
        import tempfile
        import weakref

        self.in_memory = in_memory
        self._state: dict | None = None
        self._file: Path | None = None
        self._dir: Path | None = None
        if not in_memory:
            if checkpoint_dir is not None:
                checkpoint_dir.mkdir(parents=True, exist_ok=True)
                for stale in checkpoint_dir.glob(".best-*"):  # left by a killed run
                    shutil.rmtree(stale, ignore_errors=True)
            self._dir = Path(tempfile.mkdtemp(prefix=".best-", dir=checkpoint_dir))
            weakref.finalize(self, shutil.rmtree, self._dir, ignore_errors=True)  # also when training raises

    @property
    def file(self) -> Path | None:
        """The file that holds the best weights, when they are on disk."""
        return self._file if self._state is None else None

    def set(self, state: dict | None) -> None:
        if state is None:
            return
        small = sum(t.numel() * t.element_size() for t in state.values()) <= _memory_limit()
        if self._dir is not None and not small:
            target = self._dir / "best.safetensors"
            try:
                checkpoint.write_safetensors(state, target.with_suffix(".tmp"))
                os.replace(target.with_suffix(".tmp"), target)
                self._file, self._state = target, None
                return
            except (RuntimeError, ValueError, OSError):  # shared tensors or no disk room: keep this copy in memory
                self._file = None
        if self._file is not None:
            self._file.unlink(missing_ok=True)
            self._file = None
        self._state = {k: v.detach().clone() for k, v in state.items()}

    def clear(self) -> None:
        self._state = None
        if self._file is not None:
            self._file.unlink(missing_ok=True)
            self._file = None

    def get(self) -> dict | None:
        if self._state is not None:
            return self._state
        if self._file is not None:
            from safetensors.torch import load_file

            return load_file(str(self._file))
        return None

    def close(self) -> None:
        import shutil

        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


class _InterruptFlag:
    """The first Ctrl-C asks training to stop after the current step (and checkpoint there); a second one stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        import signal

        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def install(self) -> "_InterruptFlag":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def uninstall(self) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def out_of_memory(step: int, batch: int, longest: int, cfg: TrainConfig):
    from fmtune.errors import FmtuneError

    return FmtuneError(
        f"out of memory at training step {step + 1} (a batch of {batch} texts, the longest {longest} tokens). Fix: lower "
        f"--batch-size (now {cfg.batch_size}), use --method lora (fewer optimizer states), or lower --max-length."
    )


TRIM_EVERY = 32  # steps between handing freed heap memory back to the OS


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_freed_memory() -> None:
    """Return the heap memory freed by earlier steps to the OS (glibc's malloc_trim). Batches of different lengths leave
    activation buffers of every size behind in glibc's arenas, so a process's memory creeps up through training (MiniLM,
    2 epochs: +140 MB above what it uses); trimming every TRIM_EVERY steps keeps it at what the steps use, for well under
    a millisecond a call."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


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
    is written at every epoch end and every `cfg.checkpoint_every` steps, and training resumes from the newest one,
    mid-epoch included, giving the same result as an uninterrupted run. Under torchrun (`world.size > 1`) each rank
    trains on its slice of every global batch inside DDP; only rank 0 writes checkpoints."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    from fmtune.evaluate import autocast, macro_f1

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = next(model.parameters()).device
    adapter = None
    if lora:
        model = with_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, "SEQ_CLS")
    train_ids, train_y = train
    val_ids, val_y = validation
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    table, lengths = pad_table(train_ids, pad_id)
    world = world or World()
    from fmtune.mixed_precision import Bf16Copy, EmbeddingRows, SparseEmbeddingGrad, clip_grad_norm

    # only the embedding rows the data's tokens use are trained; the rest get AdamW's weight decay once, at the end
    rows = EmbeddingRows.install(model, [train_ids, val_ids], [pad_id]) if getattr(cfg, "embedding_rows", True) and not world.distributed and not lora else None
    if rows is not None:
        table, val_ids, pad_id = rows.renumber(table), rows.renumber(val_ids), int(rows.lookup[pad_id])
    targets = torch.as_tensor(np.asarray(train_y), dtype=torch.long, device=device)
    steps_per_epoch = math.ceil(len(train_ids) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    # bf16: forward and backward on a bf16 copy of the weights, fp32 master weights in the optimizer (no autocast casts)
    compiled = bool(getattr(cfg, "compile", False))
    # a sparse gradient cannot flow out of a torch.compile'd graph: compile keeps the dense embedding gradient
    sparse_emb = SparseEmbeddingGrad.install(model) if getattr(cfg, "sparse_embedding_grad", True) and not world.distributed and not compiled else None
    mp = None
    if bf16 and getattr(cfg, "bf16_weights", True) and not world.distributed and device.type in ("cpu", "cuda"):
        mp = Bf16Copy(model, fused_step=getattr(cfg, "fused_step", True))
    fused_step = mp.step_lever if mp is not None else None
    runner = mp.compute if mp is not None else model  # the module whose forward runs (and whose dropout draws masks)
    undo_fast_dropout, fast_dropout_info = lambda: None, None
    if device.type == "cpu" and getattr(cfg, "fast_dropout", True) and not compiled:  # numpy masks would break compiled graphs
        from fmtune import fast_dropout

        undo_fast_dropout, fast_dropout_info = fast_dropout.install(runner)
    # before the optimizer: FSDP swaps in sharded parameters
    forward = mp.compute if mp is not None else wrap(model, world, getattr(cfg, "distributed", "ddp"))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = []
    head = head if head_learning_rate is not None else frozenset()  # one rate for all: the two groups that AdamW always had
    for is_head, lr in ((False, learning_rate), (True, head_learning_rate)):
        part = [(n, p) for n, p in named if (n in head) == is_head]
        groups += [{"params": [p for _, p in part if p.ndim >= 2], "weight_decay": cfg.weight_decay, "lr": lr},
                   {"params": [p for _, p in part if p.ndim < 2], "weight_decay": 0.0, "lr": lr}]
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate, fused=fused)
    params = [p for _, p in named]
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    weight = torch.as_tensor(class_weight, dtype=torch.float32, device=device) if class_weight is not None else None
    forward = torch.compile(forward, dynamic=True) if compiled else forward
    pad_to = None if getattr(cfg, "dynamic_padding", True) else int(lengths.max(initial=1))
    state = checkpoint.TrainState(epoch_rng=rng.bit_generator.state)
    best_state = BestWeights(checkpoint_dir if world.main else None, in_memory=sharded(model))
    resumed = checkpoint.latest(checkpoint_dir) if checkpoint_dir is not None else None
    if resumed is not None:
        state, resumed_best = checkpoint.load(resumed, model, optimizer)
        best_state.set(resumed_best)
        if mp is not None:
            mp.sync_all()
        scheduler.load_state_dict(state.scheduler)
        rng.bit_generator.state = state.epoch_rng
    history = state.history
    best = tuple(state.best_key)
    best_epoch, bad_epochs, step = state.best_epoch, state.bad_epochs, state.step
    stopped = f"reached the maximum of {cfg.epochs} epochs"
    real_tokens = 0
    start = time.perf_counter() - state.start_seconds

    policy = checkpoint.Policy(cfg.checkpoint_every, cfg.checkpoint_seconds, deterministic=world.distributed)

    def save(epoch: int, batch: int, epoch_rng: dict, loss_total: float) -> None:
        if checkpoint_dir is None or not (world.main or sharded(model)):  # FSDP: every rank gathers its shards, rank 0 writes
            return
        snapshot = checkpoint.TrainState(step, epoch, batch, epoch_rng, scheduler.state_dict(), list(best), best_epoch, bad_epochs, history, loss_total, time.perf_counter() - start)
        best_file = best_state.file
        checkpoint.save(checkpoint_dir, model, optimizer, snapshot, None if best_file else best_state.get(), best_file=best_file)
        policy.saved()

    done = bad_epochs >= cfg.patience
    interrupt = _InterruptFlag() if sharded(model) else _InterruptFlag().install()  # FSDP: ranks cannot agree on the step to checkpoint at
    for epoch in range(state.epoch, cfg.epochs + 1):
        if done:
            break
        model.train()
        runner.train()
        epoch_rng = rng.bit_generator.state  # the batch order of this epoch is rebuilt from it on resume
        skip = state.batch if epoch == state.epoch else 0
        epoch_first_step = step - skip
        loss_sum = torch.tensor(state.loss_sum if skip and world.main else 0.0, device=device)  # a checkpoint holds the sum over ranks
        batches = length_batches(lengths, cfg.batch_size, rng, cfg.length_bucketing)
        for b, idx in enumerate(batches):
            if b < skip:
                continue
            if interrupt.requested:  # Ctrl-C: the last step is complete, so checkpoint exactly here, then stop
                save(epoch, b, epoch_rng, float(loss_sum))
                raise KeyboardInterrupt
            local = shard(idx, world)
            target = targets[torch.from_numpy(local).to(device)]
            denominator = weight[targets[torch.from_numpy(idx).to(device)]].sum() if weight is not None else float(len(idx))
            try:
                if len(local):
                    input_ids, mask = batch_tensors(table, lengths, local, device, pad_to)
                    with autocast(device, bf16 and mp is None):
                        logits = forward(input_ids=input_ids, attention_mask=mask).logits
                    # the sum over this rank's slice of the global batch, scaled so DDP's gradient average is the global mean
                    losses = torch.nn.functional.cross_entropy(logits.float(), target, weight=weight, reduction="sum")
                    loss = losses / denominator * world.size
                else:  # a global batch smaller than the number of ranks: take part in the gradient average with zero
                    losses = loss = zero_loss(forward, *batch_tensors(table, lengths, idx[:1], device, pad_to))
                loss.backward()
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
                    raise out_of_memory(step, len(local), int(lengths[local].max(initial=0)), cfg) from None
                raise
            if mp is not None:
                mp.step(optimizer, 1.0, sparse_emb)
                if sparse_emb is None:
                    for p in mp.shared:
                        p.grad = None
            else:
                if world.distributed:  # torch's clip knows how to reduce norms over FSDP shards
                    torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
                else:
                    clip_grad_norm(params, 1.0, sparse_emb)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if sparse_emb is not None:
                sparse_emb.zero()
            scheduler.step()
            loss_sum += losses.detach() * (len(idx) / denominator if weight is not None else 1.0)
            real_tokens += int(lengths[idx].sum())
            step += 1
            if progress:
                progress(len(idx), {})
            if step % TRIM_EVERY == 0:
                release_freed_memory()
            if policy.within_epoch(step) and b + 1 < len(batches):
                save(epoch, b + 1, epoch_rng, float(all_sum(loss_sum.clone(), world)))
        train_loss = float(all_sum(loss_sum, world)) / len(train_ids)
        if not math.isfinite(train_loss):
            from fmtune.errors import FmtuneError

            raise FmtuneError(f"training loss became {train_loss} in epoch {epoch} (between steps {epoch_first_step + 1} and {step}; checked once per epoch to keep the loop free of per-step syncs). Fix: lower --learning-rate (now {learning_rate:g})" + (f" or --head-learning-rate (now {head_learning_rate:g})" if head else "") + " or turn bf16 off with --bf16 off.")
        val_loss, val_pred = evaluate_split(runner, val_ids, val_y, pad_id, eval_batch_size, bf16, class_weight)
        val_f1 = macro_f1(val_y, val_pred, n_classes)
        row = {"epoch": epoch, "step": step, "train_loss": round(train_loss, 5), "val_loss": round(val_loss, 5), "val_macro_f1": round(val_f1, 5), "seconds": round(time.perf_counter() - start, 2)}
        history.append(row)
        if progress:
            progress(0, row)
        improved = val_f1 > best[0] + cfg.min_delta or (abs(val_f1 - best[0]) <= cfg.min_delta and val_loss < best[1])
        if improved:
            best, best_epoch, bad_epochs = (val_f1, val_loss), epoch, 0
            if epoch < cfg.epochs:
                best_state.set(model.state_dict())
            else:  # the last epoch is the best: the weights as they are now are the ones to return, no copy needed
                best_state.clear()
        else:
            bad_epochs += 1
            done = bad_epochs >= cfg.patience
        if policy.at_epoch_end() and not done and epoch < cfg.epochs:  # the rung's end is marked by the caller (checkpoint.mark_done)
            save(epoch + 1, 0, rng.bit_generator.state, 0.0)
        elif interrupt.requested:  # Ctrl-C during the validation pass: checkpoint here, as at any step
            save(epoch + 1, 0, rng.bit_generator.state, 0.0)
    interrupt.uninstall()
    undo_fast_dropout()
    del runner, forward
    mp_used = mp is not None
    if mp is not None:
        fused_step = mp.step_lever  # as it ran (a non-AdamW optimizer falls back to torch's passes)
        mp.close()
        mp = None  # the bf16 copy is not needed any more
    if sparse_emb is not None:
        sparse_emb.remove()
    if interrupt.requested:  # Ctrl-C during the last validation pass: the epoch-end checkpoint is written
        raise KeyboardInterrupt
    if bad_epochs >= cfg.patience:
        stopped = f"early stopping: validation macro-F1 did not improve for {cfg.patience} epochs after epoch {best_epoch}"
    seconds = time.perf_counter() - start
    best_weights = best_state.get()
    best_state.close()
    returned_step = next((h["step"] for h in history if h["epoch"] == best_epoch), step) if best_weights is not None else step
    if best_weights is not None:
        optimizer.state.clear()  # the AdamW moments are not needed any more: free them before the best weights are loaded
        model.load_state_dict(best_weights)
        del best_weights
    if rows is not None:  # the untrained rows decayed as AdamW would have decayed them up to the returned weights' step
        rows.uninstall(weight_decay_product(learning_rate, scheduler.lr_lambdas[0], cfg.weight_decay, returned_step))
    model = unwrap(model)  # FSDP: gathered into a plain copy on every rank; otherwise the model itself
    if lora:
        from peft import get_peft_model_state_dict

        adapter = {"config": model.peft_config["default"], "state": {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}}
        model = model.merge_and_unload()
    model.eval()
    levers = {
        "bf16": bf16,
        "bf16_weights": ("bf16 copy of the weights, fp32 master weights" if mp_used else "autocast") if bf16 else None,
        "sparse_embedding_grad": sparse_emb is not None,
        "embedding_rows": rows.info() if rows is not None else None,
        "malloc_trim_every": TRIM_EVERY if _malloc_trim() is not None else None,
        "length_bucketing": cfg.length_bucketing,
        "dynamic_padding": pad_to is None,
        "fused_optimizer": fused,
        "fused_step": fused_step,
        "torch_compile": compiled,
        "dropout": _dropout(model),
        "fast_dropout": fast_dropout_info,
        "attention": getattr(getattr(model, "config", None), "_attn_implementation", None),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "omp_wait": threads.choice(),
        "inference_mode_eval": True,
        "lora": lora,
    }
    return TrainResult(model, history, best_epoch, len(history), step, seconds, stopped, levers, adapter, real_tokens)
