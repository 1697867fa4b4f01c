"""The training loop both task kinds run: fmtune.training.train.fit (an encoder classifier) and fmtune.models.causal_lm.fit (a causal LM).

The loop owns what the two share: precision (a bf16 copy of the weights with fp32 masters, or autocast; the sparse
embedding gradient; fast dropout), AdamW's parameter groups (decay / no decay, a new head at its own learning rate),
the linear schedule with warmup, DDP/FSDP with each rank on its slice of every global batch, early stopping with
best-epoch selection (BestWeights), checkpoints and resume (checkpoint.Policy), Ctrl-C, the out-of-memory message,
progress callbacks and the levers it decided. A task kind brings a `Task`: the loss of a global batch on this rank and
the validation score. Same seed, same batches, same result, whatever the task.
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fmtune.config import TrainConfig
from fmtune.models.loading import with_lora
from fmtune.training import checkpoint
from fmtune.training.distributed import World, all_sum, shard, sharded, unwrap, wrap


@dataclass
class Task:
    """What a task kind decides inside the loop."""

    lengths: np.ndarray  # tokens of each training example: length-bucketed batches, real tokens, the out-of-memory message
    # (forward, global batch, this rank's slice) -> (this rank's loss to back-propagate, scaled so that DDP's gradient
    # average is the global batch's mean; this rank's summed loss, added up for the epoch's training loss)
    loss: Callable[[Callable, np.ndarray, np.ndarray], tuple[Any, Any]]
    train_loss: Callable[[Any], float]  # the epoch's summed loss over every rank (a 0-d tensor) -> the epoch's mean loss
    # the model to score -> (the history row's validation fields, (score, validation loss)): a higher score is better,
    # and within `min_delta` of the best score a lower validation loss is
    validate: Callable[[Any], tuple[dict, tuple[float, float]]]
    metric: str  # what the score is, for "early stopping: <metric> did not improve ..."
    min_delta: float = 0.0
    # the training loss of a model that ignores its input (classification: the entropy of the class prior the loss
    # weighs); while the epoch's training loss is above LEARNED_SHARE of it the model has not left chance, and early
    # stopping waits: a noisy validation score must not end a rung that has not started to learn. None: not known.
    chance_loss: float | None = None
    min_epochs: int = 1  # early stopping cannot end training before this epoch (a minimum training budget)
    module: Callable[[Any], Any] = lambda model: model  # the model -> the module `loss` calls as `forward` (what DDP wraps)
    sparse_embedding: bool = False  # the input embedding's gradient kept sparse (mixed_precision.SparseEmbeddingGrad)
    compile: bool = False  # torch.compile of the forward pass


def start(model, cfg: TrainConfig, seed: int, lora: bool, task_type: str):
    """Seed torch (LoRA's initial weights and dropout draw from it), and put a LoRA adapter on the model when asked."""
    import torch

    torch.manual_seed(seed)
    return with_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, task_type) if lora else model


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


# ---------------------------------------------------------------- best weights, Ctrl-C, memory

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


def trainable(model) -> dict:
    """The weights training changes (all of them, or LoRA's adapter and the head), as the model holds them (no copy,
    FSDP shards stay shards): what the best epoch's copy keeps."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in names}


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


LEARNED_SHARE = 0.9  # a training loss above this share of the chance loss: the model has not left chance yet


def learned(train_loss: float, chance_loss: float | None) -> bool | None:
    """Whether a training loss is clearly below chance (None when chance is not known)."""
    return None if chance_loss is None else train_loss < LEARNED_SHARE * chance_loss


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


# ---------------------------------------------------------------- setting up


@dataclass
class _Precision:
    """How forward, backward and the optimizer step run (the levers of fmtune.training.mixed_precision and fast_dropout)."""

    mp: Any  # mixed_precision.Bf16Copy: forward and backward on a bf16 copy, fp32 master weights; or None
    sparse: Any  # mixed_precision.SparseEmbeddingGrad, or None
    runner: Any  # the module whose forward runs (and whose dropout draws masks): the bf16 copy, or the model
    autocast: bool  # bf16 without a bf16 copy: autocast around the forward
    undo_fast_dropout: Callable[[], None]
    fast_dropout: dict | None


def _precision(model, task: Task, cfg: TrainConfig, bf16: bool, world: World) -> _Precision:
    from fmtune.training.mixed_precision import Bf16Copy, SparseEmbeddingGrad

    device = next(model.parameters()).device
    # a sparse gradient cannot flow out of a torch.compile'd graph: compile keeps the dense embedding gradient
    sparse_on = task.sparse_embedding and getattr(cfg, "sparse_embedding_grad", True) and not world.distributed and not task.compile
    sparse = SparseEmbeddingGrad.install(model) if sparse_on else None
    mp = None
    if bf16 and getattr(cfg, "bf16_weights", True) and not world.distributed and device.type in ("cpu", "cuda"):
        mp = Bf16Copy(model, fused_step=getattr(cfg, "fused_step", True))
    runner = mp.compute if mp is not None else model
    undo, info = (lambda: None), None
    if device.type == "cpu" and getattr(cfg, "fast_dropout", True) and not task.compile:  # numpy masks would break compiled graphs
        from fmtune.training import fast_dropout

        undo, info = fast_dropout.install(runner)
    return _Precision(mp, sparse, runner, bf16 and mp is None, undo, info)


def _optimizer(model, cfg: TrainConfig, learning_rate: float, head: frozenset[str], head_learning_rate: float | None, total_steps: int):
    """AdamW over the trainable weights: matrices decay, biases and norms do not; with `head_learning_rate`, the `head`
    parameters in groups of their own at that rate. Returns (optimizer, linear schedule with warmup, parameters)."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = []
    head = head if head_learning_rate is not None else frozenset()  # one rate for all: the two groups that AdamW always had
    for is_head, lr in ((False, learning_rate), (True, head_learning_rate)):
        part = [(n, p) for n, p in named if (n in head) == is_head]
        groups += [{"params": [p for _, p in part if p.ndim >= 2], "weight_decay": cfg.weight_decay, "lr": lr},
                   {"params": [p for _, p in part if p.ndim < 2], "weight_decay": 0.0, "lr": lr}]
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate, fused=fused)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    return optimizer, scheduler, [p for _, p in named]


def _with_autocast(forward: Callable, device, on: bool) -> Callable:
    if not on:
        return forward
    from fmtune.evidence.evaluate import autocast

    def run(*args, **kwargs):
        with autocast(device, True):
            return forward(*args, **kwargs)

    return run


@dataclass
class _Run:
    """The loop's working state: what a step, an epoch end and a checkpoint share."""

    model: Any
    task: Task
    cfg: TrainConfig
    world: World
    rng: np.random.Generator
    precision: _Precision
    forward: Callable
    optimizer: Any
    scheduler: Any
    params: list
    best: BestWeights
    state: checkpoint.TrainState  # step, early stopping and history, continued from a checkpoint when resumed
    checkpoint_dir: Path | None
    progress: Callable[[int, dict], None] | None
    policy: checkpoint.Policy
    interrupt: _InterruptFlag
    start: float = 0.0
    loss_sum: Any = None  # this epoch's summed training loss on this rank (a tensor on the device)
    real_tokens: int = 0
    first_step: int = 0  # the step this epoch started at
    levers: dict = field(default_factory=dict)


def _resume(run: _Run) -> None:
    """Continue from the newest checkpoint under run.checkpoint_dir, if any: weights, optimizer, schedule, RNG, data
    position, early stopping, history."""
    path = checkpoint.latest(run.checkpoint_dir) if run.checkpoint_dir is not None else None
    if path is None:
        return
    run.state, best = checkpoint.load(path, run.model, run.optimizer)
    run.best.set(best)
    if run.precision.mp is not None:
        run.precision.mp.sync_all()
    run.scheduler.load_state_dict(run.state.scheduler)
    run.rng.bit_generator.state = run.state.epoch_rng


def _save(run: _Run, epoch: int, batch: int, epoch_rng: dict, loss_total: float) -> None:
    """A checkpoint at the start of batch `batch` of `epoch` (rank 0 writes; under FSDP every rank gathers its shards)."""
    if run.checkpoint_dir is None or not (run.world.main or sharded(run.model)):
        return
    snapshot = replace(run.state, epoch=epoch, batch=batch, epoch_rng=epoch_rng, scheduler=run.scheduler.state_dict(), loss_sum=loss_total,
                       start_seconds=time.perf_counter() - run.start)
    best_file = run.best.file
    checkpoint.save(run.checkpoint_dir, run.model, run.optimizer, snapshot, None if best_file else run.best.get(), best_file=best_file)
    run.policy.saved()


# ---------------------------------------------------------------- training


def train(model, task: Task, cfg: TrainConfig, *, seed: int, learning_rate: float, bf16: bool, world: World | None = None,
          checkpoint_dir: Path | None = None, progress: Callable[[int, dict], None] | None = None,
          head: frozenset[str] = frozenset(), head_learning_rate: float | None = None) -> "Outcome":
    """Train `model` on `task` for up to cfg.epochs epochs with early stopping; returns the best epoch's weights loaded.

    With `checkpoint_dir`, checkpoints follow checkpoint.Policy (--checkpoint-every, else --checkpoint-seconds; epoch
    ends only when distributed) and training resumes from the newest one, mid-epoch included, to the same result as an
    uninterrupted run. Under torchrun (`world.size > 1`) each rank trains on its slice of every global batch inside
    DDP or FSDP; only rank 0 writes checkpoints."""
    world = world or World()
    precision = _precision(model, task, cfg, bf16, world)
    # before the optimizer: FSDP swaps in sharded parameters
    forward = task.module(precision.mp.compute) if precision.mp is not None else wrap(task.module(model), world, getattr(cfg, "distributed", "ddp"))
    total_steps = math.ceil(len(task.lengths) / cfg.batch_size) * cfg.epochs
    optimizer, scheduler, params = _optimizer(model, cfg, learning_rate, head, head_learning_rate, total_steps)
    if task.compile:
        import torch

        forward = torch.compile(forward, dynamic=True)
    device = next(model.parameters()).device
    rng = np.random.default_rng(seed)
    run = _Run(model, task, cfg, world, rng, precision, _with_autocast(forward, device, precision.autocast), optimizer, scheduler, params,
               BestWeights(checkpoint_dir if world.main else None, in_memory=sharded(model)),
               checkpoint.TrainState(epoch_rng=rng.bit_generator.state), checkpoint_dir, progress,
               checkpoint.Policy(cfg.checkpoint_every, cfg.checkpoint_seconds, deterministic=world.distributed),
               _InterruptFlag() if sharded(model) else _InterruptFlag().install())  # FSDP: ranks cannot agree on the step to checkpoint at
    run.levers = {"fused_optimizer": bool(optimizer.defaults.get("fused")), "torch_compile": task.compile}
    try:
        _resume(run)
        run.start = time.perf_counter() - run.state.start_seconds
        done = run.state.bad_epochs >= cfg.patience
        for epoch in range(run.state.epoch, cfg.epochs + 1):
            if done:
                break
            train_loss = _train_epoch(run, epoch, learning_rate, head_learning_rate if head else None)
            done = _end_epoch(run, epoch, train_loss)
    finally:
        run.interrupt.uninstall()
    return _finish(run, bf16)


def _train_epoch(run: _Run, epoch: int, learning_rate: float, head_learning_rate: float | None) -> float:
    import torch

    run.model.train()
    run.precision.runner.train()
    epoch_rng = run.rng.bit_generator.state  # the batch order of this epoch is rebuilt from it on resume
    resumed = run.state.batch if epoch == run.state.epoch else 0
    run.first_step = run.state.step - resumed
    device = next(run.model.parameters()).device
    # a checkpoint holds the sum over ranks: rank 0 continues from it
    run.loss_sum = torch.tensor(run.state.loss_sum if resumed and run.world.main else 0.0, device=device)
    batches = length_batches(run.task.lengths, run.cfg.batch_size, run.rng, run.cfg.length_bucketing)
    for b, idx in enumerate(batches):
        if b < resumed:
            continue
        if run.interrupt.requested:  # Ctrl-C: the last step is complete, so checkpoint exactly here, then stop
            _save(run, epoch, b, epoch_rng, float(run.loss_sum))
            raise KeyboardInterrupt
        _step(run, idx)
        if run.policy.within_epoch(run.state.step) and b + 1 < len(batches):
            _save(run, epoch, b + 1, epoch_rng, float(all_sum(run.loss_sum.clone(), run.world)))
    train_loss = run.task.train_loss(all_sum(run.loss_sum, run.world))
    if not math.isfinite(train_loss):
        from fmtune.errors import FmtuneError

        raise FmtuneError(f"training loss became {train_loss} in epoch {epoch} (between steps {run.first_step + 1} and {run.state.step}; checked once per epoch to keep the loop free of per-step syncs). Fix: lower --learning-rate (now {learning_rate:g})"
                          + (f" or --head-learning-rate (now {head_learning_rate:g})" if head_learning_rate is not None else "") + " or turn bf16 off with --bf16 off.")
    return train_loss


def _step(run: _Run, idx: np.ndarray) -> None:
    """One optimizer step on global batch `idx` (this rank: its slice of it)."""
    import torch

    local = shard(idx, run.world)
    try:
        loss, summed = run.task.loss(run.forward, idx, local)
        loss.backward()
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
            raise out_of_memory(run.state.step, len(local), int(run.task.lengths[local].max(initial=0)), run.cfg) from None
        raise
    mp, sparse = run.precision.mp, run.precision.sparse
    if mp is not None:
        mp.step(run.optimizer, 1.0, sparse)
        if sparse is None:
            for p in mp.shared:
                p.grad = None
    else:
        if run.world.distributed:  # torch's clip knows how to reduce norms over FSDP shards
            torch.nn.utils.clip_grad_norm_(run.params, 1.0, foreach=True)
        else:
            from fmtune.training.mixed_precision import clip_grad_norm

            clip_grad_norm(run.params, 1.0, sparse)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    if sparse is not None:
        sparse.zero()
    run.scheduler.step()
    run.loss_sum += summed
    run.real_tokens += int(run.task.lengths[idx].sum())
    run.state.step += 1
    if run.progress:
        run.progress(len(idx), {})
    if run.state.step % TRIM_EVERY == 0:
        release_freed_memory()


def _end_epoch(run: _Run, epoch: int, train_loss: float) -> bool:
    """Validate, keep the best epoch's weights, checkpoint; returns whether early stopping ends training here."""
    fields, (score, val_loss) = run.task.validate(run.precision.runner)
    state, cfg = run.state, run.cfg
    row = {"epoch": epoch, "step": state.step, "train_loss": round(train_loss, 5), **fields, "seconds": round(time.perf_counter() - run.start, 2)}
    state.history.append(row)
    if run.progress:
        run.progress(0, row)
    best_score, best_loss = state.best_key
    delta = run.task.min_delta
    if score > best_score + delta or (abs(score - best_score) <= delta and val_loss < best_loss):
        state.best_key, state.best_epoch, state.bad_epochs = [score, val_loss], epoch, 0
        if epoch < cfg.epochs:
            run.best.set(trainable(run.model))
        else:  # the last epoch is the best: the weights as they are now are the ones to return, no copy needed
            run.best.clear()
    elif epoch >= run.task.min_epochs and learned(train_loss, run.task.chance_loss) is not False:
        state.bad_epochs += 1  # only once the minimum budget is spent and the model has left chance
    done = state.bad_epochs >= cfg.patience
    if (run.policy.at_epoch_end() and not done and epoch < cfg.epochs) or run.interrupt.requested:
        # the rung's end is marked by the caller (checkpoint.mark_done); Ctrl-C during the validation pass: checkpoint here
        _save(run, epoch + 1, 0, run.rng.bit_generator.state, 0.0)
    return done


@dataclass
class Outcome:
    """What the loop hands back to its task's fit."""

    model: Any  # the best epoch's weights loaded (still LoRA-wrapped and, under FSDP, sharded: see `finish`)
    history: list[dict]
    best_epoch: int
    steps: int
    seconds: float
    stopped: str  # why training ended, in words
    real_tokens: int  # non-pad tokens trained on (all epochs, the global batches)
    returned_step: int  # the step of the returned weights
    lr_lambda: Callable[[int], float]  # the schedule's multiplier of the learning rate at a step
    levers: dict  # bf16, bf16_weights, sparse_embedding_grad, malloc_trim_every, fused_optimizer, fused_step, torch_compile, fast_dropout
    learned: bool | None = None  # the returned epoch's training loss clearly below chance (None: chance not known)


def _finish(run: _Run, bf16: bool) -> Outcome:
    precision, state = run.precision, run.state
    precision.undo_fast_dropout()
    mp = precision.mp
    fused_step = None
    if mp is not None:
        fused_step = mp.step_lever  # as it ran (a non-AdamW optimizer falls back to torch's passes)
        mp.close()
    precision.mp = precision.runner = run.forward = None  # the bf16 copy is not needed any more
    if precision.sparse is not None:
        precision.sparse.remove()
    if run.interrupt.requested:  # Ctrl-C during the last validation pass: the epoch-end checkpoint is written
        raise KeyboardInterrupt
    stopped = f"reached the maximum of {run.cfg.epochs} epochs"
    if state.bad_epochs >= run.cfg.patience:
        stopped = f"early stopping: {run.task.metric} did not improve for {run.cfg.patience} epochs after epoch {state.best_epoch}"
    best_row = next((h for h in state.history if h["epoch"] == state.best_epoch), None)
    has_learned = learned(best_row["train_loss"], run.task.chance_loss) if best_row is not None else None
    if has_learned is False:
        stopped += f" (the training loss of the returned epoch, {best_row['train_loss']:.3f}, is still near chance, {run.task.chance_loss:.3f}: the model did not learn)"
    seconds = time.perf_counter() - run.start
    best = run.best.get()
    run.best.close()
    returned_step = next((h["step"] for h in state.history if h["epoch"] == state.best_epoch), state.step) if best is not None else state.step
    if best is not None:
        run.optimizer.state.clear()  # the AdamW moments are not needed any more: free them before the best weights are loaded
        run.model.load_state_dict(best, strict=False)  # the trainable weights (loop.trainable)
        del best
    levers = {"bf16": bf16, "bf16_weights": ("bf16 copy of the weights, fp32 master weights" if mp is not None else "autocast") if bf16 else None,
              "sparse_embedding_grad": precision.sparse is not None, "malloc_trim_every": TRIM_EVERY if _malloc_trim() is not None else None,
              **run.levers, "fused_step": fused_step, "fast_dropout": precision.fast_dropout}
    return Outcome(run.model, state.history, state.best_epoch, state.step, seconds, stopped, run.real_tokens, returned_step, run.scheduler.lr_lambdas[0], levers,
                   has_learned)


def finish(model, lora: bool) -> tuple[Any, dict | None]:
    """The trained model as callers keep it: whole (FSDP: gathered on every rank, a collective), LoRA merged into a plain
    transformers model with the adapter kept beside it ({"config": LoraConfig, "state": adapter tensors}), in eval mode."""
    model = unwrap(model)
    adapter = None
    if lora:
        from peft import get_peft_model_state_dict

        adapter = {"config": model.peft_config["default"], "state": {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}}
        model = model.merge_and_unload()
    model.eval()
    return model, adapter
