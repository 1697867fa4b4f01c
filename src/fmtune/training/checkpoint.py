"""Crash-safe training checkpoints: weights, optimizer, scheduler, RNG states and data position, safetensors + JSON only.

Layout under a rung's checkpoint folder (e.g. RUN/.partial/checkpoints/fine_tuned/):
  step-000120/            one complete checkpoint (written as .tmp-step-000120, fsynced, then renamed)
    trainable.safetensors   the trainable weights (all weights, or the LoRA adapter + head)
    best.safetensors        the best-epoch weights so far (early stopping restores them at the end), if any
    optimizer.safetensors   AdamW moments per parameter
    rng.safetensors         torch CPU RNG state
    state.json              step, epoch, batch position, numpy RNG state, scheduler state, early-stopping state, history
  latest                  the name of the newest complete checkpoint (replaced atomically)
  done.json + final.safetensors   written when the rung finished: a resumed run reuses them instead of training again
No pickle is ever written or read.

Under FSDP (`--distributed fsdp`) the model's parameters and AdamW moments are shards on each rank: save gathers whole
tensors (a collective every rank calls; only rank 0 writes) and load cuts them into this run's shards, so the files are
the same as in one process, and a checkpoint resumes under any number of processes and either strategy.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly where it stopped."""

    step: int = 0
    epoch: int = 1  # the epoch in progress (1-based)
    batch: int = 0  # batches of this epoch already done
    epoch_rng: dict = field(default_factory=dict)  # numpy bit-generator state at the start of this epoch
    scheduler: dict = field(default_factory=dict)
    best_key: list = field(default_factory=lambda: [-float("inf"), float("inf")])  # (score, validation loss) of the best epoch
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list = field(default_factory=list)
    loss_sum: float = 0.0  # sum of (loss * batch size) so far in this epoch
    start_seconds: float = 0.0  # training seconds spent before this checkpoint


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64", "int32": "I32", "int16": "I16",
           "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def write_safetensors(tensors: dict, path: Path | str) -> None:
    """Write `tensors` as a safetensors file, streaming each tensor's bytes from its own memory. safetensors'
    save_file first copies every tensor into one bytes object, so saving a model's weights or its AdamW moments raised
    peak memory by their whole size (90 MB for MiniLM's weights, 360 MB for a checkpoint); this raises it by nothing.
    The file is the standard format (read back by safetensors.torch.load_file)."""
    import json
    import struct

    import torch

    flat = {}
    header: dict = {}
    offset = 0
    for name in sorted(tensors):
        t = tensors[name].detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        code = _DTYPES.get(str(t.dtype).removeprefix("torch."))
        if code is None:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be written to safetensors")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        flat[name] = t.reshape(-1).view(torch.uint8) if nbytes else None
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in sorted(tensors):
            if flat[name] is not None:
                f.write(memoryview(flat[name].numpy()))


def trainable_state(model) -> dict:
    """The weights that training changes (for LoRA: the adapter and the task head). Under FSDP: gathered whole, on
    rank 0 only (a collective)."""
    from fmtune.training.distributed import gather, sharded

    names = {n for n, p in model.named_parameters() if p.requires_grad}
    state = model.state_dict()
    chosen = {k: v for k, v in state.items() if k in names} or state
    return gather(chosen) if sharded(model) else chosen


def optimizer_tensors(optimizer, model) -> tuple[dict, dict]:
    """AdamW state as flat tensors keyed by parameter name, plus the param-group hyperparameters as JSON. Under FSDP:
    gathered whole, on rank 0 only (a collective)."""
    import torch

    from fmtune.training.distributed import gather, sharded

    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                tensors[f"{names[id(p)]}::{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "n_params": len(g["params"])} for g in optimizer.param_groups]
    return (gather(tensors) if sharded(model) else tensors), {"param_groups": groups}


def load_optimizer(optimizer, model, tensors: dict, meta: dict) -> None:
    from fmtune.errors import FmtuneError
    from fmtune.training.distributed import sharded

    layout, saved_layout = [len(g["params"]) for g in optimizer.param_groups], [g.get("n_params") for g in meta["param_groups"]]
    if len(layout) != len(saved_layout) or any(n is not None and n != m for n, m in zip(saved_layout, layout)):
        raise FmtuneError(
            f"the checkpoint's optimizer has parameter groups of {saved_layout} parameters, this run's {layout} (it was written by "
            f"another fmtune version or with other learning-rate settings); start again without --resume, with --overwrite."
        )
    params = dict(model.named_parameters())
    for flat, value in tensors.items():
        name, key = flat.split("::", 1)
        p = params[name]
        optimizer.state[p][key] = _shard_like(value, p) if sharded(model) else value.clone()
    for group, saved in zip(optimizer.param_groups, meta["param_groups"]):
        group.update({k: v for k, v in saved.items() if k in group and k != "n_params"})


class Policy:
    """When to write a checkpoint. Every `every` steps and at every epoch end when the user set --checkpoint-every;
    otherwise by time: when `seconds` of training have passed since the last checkpoint, at any step, so a kill loses at
    most that much and a cheap epoch writes nothing (a checkpoint is the weights plus twice their size of AdamW state:
    one per epoch wrote 14 GB for an 88 MB run). `deterministic` (several processes: each rank has its own clock, but
    all ranks must agree on every save, whose loss sum is a collective and, under FSDP, whose gather is one) keeps the
    epoch ends, which all ranks reach together."""

    def __init__(self, every: int, seconds: float, deterministic: bool = False) -> None:
        import time

        self.every, self.seconds, self.deterministic = every, seconds, deterministic
        self._clock = time.perf_counter
        self._last = self._clock()

    def saved(self) -> None:
        self._last = self._clock()

    def _due(self) -> bool:
        return self._clock() - self._last >= self.seconds

    def within_epoch(self, step: int) -> bool:
        if self.every:
            return step % self.every == 0
        return bool(self.seconds) and not self.deterministic and self._due()

    def at_epoch_end(self) -> bool:
        return bool(self.every) or not self.seconds or self.deterministic or self._due()


def save(folder: Path, model, optimizer, state: TrainState, best: dict | None, keep: int = 1, best_file: Path | None = None) -> Path | None:
    """Write one complete checkpoint atomically, point `latest` at it, and prune older ones. A full disk keeps the
    last complete checkpoint and stops with an error that says so. Under FSDP every rank calls it (the shards are
    gathered together); rank 0 writes and gets the path, the others None."""
    import errno

    from fmtune.errors import FmtuneError

    try:
        return _save(folder, model, optimizer, state, best, keep, best_file)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        shutil.rmtree(folder / f".tmp-step-{state.step:07d}", ignore_errors=True)
        kept = latest(folder)
        where = f"the last complete checkpoint ({kept.name}) is kept" if kept else "no earlier checkpoint exists"
        raise FmtuneError(f"disk full while writing a checkpoint under {folder} (step {state.step}); {where}. Fix: free disk space, then re-run the same command with --resume.") from None


def _shard_like(value, param):
    """A whole optimizer tensor cut into `param`'s FSDP shard (the step count, a scalar, is kept whole)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor) and value.shape == param.shape:
        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    return value.to(param.device)


def _save(folder: Path, model, optimizer, state: TrainState, best: dict | None, keep: int, best_file: Path | None = None) -> Path | None:
    import torch

    from fmtune.training.distributed import gather, sharded

    weights = trainable_state(model)
    opt_tensors, opt_meta = optimizer_tensors(optimizer, model)
    if sharded(model):  # every rank took part in gathering the shards; rank 0 writes
        import torch.distributed as dist

        best = gather(best) if best is not None else None
        if dist.get_rank() != 0:
            return None
    folder.mkdir(parents=True, exist_ok=True)
    name = f"step-{state.step:07d}"
    tmp = folder / f".tmp-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write_safetensors(weights, tmp / "trainable.safetensors")
    # the best weights already on disk (train.BestWeights) get a second name for the same bytes: nothing written
    linked = best_file is not None and _link(best_file, tmp / "best.safetensors")
    if not linked:
        if best is None and best_file is not None and best_file.is_file():
            from safetensors.torch import load_file

            best = load_file(str(best_file))
        if best is not None:
            write_safetensors(best, tmp / "best.safetensors")
    write_safetensors(opt_tensors, tmp / "optimizer.safetensors")
    write_safetensors({"torch_cpu": torch.get_rng_state()}, tmp / "rng.safetensors")
    body = dict(state.__dict__, optimizer=opt_meta)
    _write_json(tmp / "state.json", body)
    for f in tmp.iterdir():
        if linked and f.name == "best.safetensors":
            continue  # a link to a file fsynced when it was written
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    final = folder / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(folder)
    _write_json(folder / "latest", {"checkpoint": name})
    for old in sorted(p for p in folder.glob("step-*") if p.name != name)[: max(0, len(list(folder.glob("step-*"))) - keep)]:
        _discard(old)
    for leftover in folder.glob(".old-*"):  # a prune cut short by a kill
        shutil.rmtree(leftover, ignore_errors=True)
    return final


def _link(source: Path, target: Path) -> bool:
    try:
        os.link(source, target)
        return True
    except OSError:  # another filesystem, or links not supported: write a copy instead
        return False


def _discard(path: Path) -> None:
    """Delete a checkpoint folder so that no kill can leave it half-deleted under its own name: rename it out of the
    `step-*` namespace first (atomic), then remove it."""
    gone = path.with_name(".old-" + path.name)
    try:
        os.replace(path, gone)
    except OSError:
        return
    shutil.rmtree(gone, ignore_errors=True)


def latest(folder: Path) -> Path | None:
    pointer = folder / "latest"
    if not pointer.is_file():
        return None
    try:
        path = folder / json.loads(pointer.read_text())["checkpoint"]
    except (ValueError, KeyError):
        return None
    return path if (path / "state.json").is_file() else None


def load(path: Path, model, optimizer) -> tuple[TrainState, dict | None]:
    """Restore weights, optimizer and torch RNG in place; return the loop state and the best weights so far. Under FSDP
    every rank calls it and reads the same files; weights and best weights come back as this rank's shards."""
    import torch
    from safetensors.torch import load_file

    from fmtune.training.distributed import scatter_like, sharded

    weights = load_file(str(path / "trainable.safetensors"))
    model.load_state_dict(scatter_like(weights, model) if sharded(model) else weights, strict=False)
    body = json.loads((path / "state.json").read_text())
    load_optimizer(optimizer, model, load_file(str(path / "optimizer.safetensors")), body.pop("optimizer"))
    torch.set_rng_state(load_file(str(path / "rng.safetensors"))["torch_cpu"])
    best = load_file(str(path / "best.safetensors")) if (path / "best.safetensors").is_file() else None
    if best is not None and sharded(model):
        best = scatter_like(best, model)
    return TrainState(**body), best


def mark_done(folder: Path, model, result: dict) -> None:
    """The rung finished: keep its result (and, when `model` is given, its final weights) so a resumed run does not train
    it again; its training checkpoints go. Rungs whose model is not used after scoring pass None and keep their test
    predictions in `result` instead of a copy of the weights."""
    folder.mkdir(parents=True, exist_ok=True)
    if model is not None:
        write_safetensors(model.state_dict(), folder / "final.safetensors.tmp")
        os.replace(folder / "final.safetensors.tmp", folder / "final.safetensors")
    _write_json(folder / "done.json", {**result, "has_weights": model is not None})
    for old in folder.glob("step-*"):
        _discard(old)
    (folder / "latest").unlink(missing_ok=True)


def load_done(folder: Path) -> tuple[dict, dict | None] | None:
    """(result, final weights or None) of a finished rung; None when the rung did not finish."""
    from safetensors.torch import load_file

    if not (folder / "done.json").is_file():
        return None
    result = json.loads((folder / "done.json").read_text())
    has_weights = result.pop("has_weights", True)
    if not has_weights:
        return result, None
    if not (folder / "final.safetensors").is_file():
        return None
    return result, load_file(str(folder / "final.safetensors"))
