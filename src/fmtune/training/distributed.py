"""Data-parallel training under torchrun / accelerate launch: DDP, or FSDP (PyTorch's FSDP2, `fully_shard`) for
models whose weights, gradients and optimizer state do not fit one device. No home-made distribution: torch.distributed
does the work; this module reads the launcher's environment, shards global batches, wraps the model, gathers sharded
weights where a full copy is needed, and launches torchrun for --nproc.

Every rank runs the same pipeline on the same data and seed, so every rank builds the same global batches; each rank
trains on its slice of every global batch and DDP (or FSDP's reduce-scatter) averages the gradients, which equals one
process on the whole batch. Only rank 0 writes the run folder, the report and the registry.

Under FSDP the model is sharded in place: its parameters become DTensor shards, so anything that needs whole weights
goes through a collective that every rank must call together (`gather`, checkpoint.save / load, `unwrap`).
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """The process's place in the launch, from the variables torchrun and accelerate set."""
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def init(device_type: str) -> World:
    """Join the process group when launched with more than one process (gloo on CPU, nccl on GPU)."""
    import torch.distributed as dist

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        from fmtune.errors import FmtuneError

        raise FmtuneError(
            "accelerate launch was given a DeepSpeed config, but fmtune's training loop is plain PyTorch and never creates a "
            "DeepSpeed engine, so every ZeRO setting would be silently ignored. Fix: launch with an accelerate config whose "
            "distributed_type is FSDP (docs/configs/accelerate_fsdp.yaml) and pass --distributed fsdp, which shards "
            "parameters, gradients and optimizer state across processes as ZeRO-3 does (see docs/distributed.md)."
        )
    w = world()
    if w.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return w


def shard(idx: np.ndarray, w: World) -> np.ndarray:
    """This rank's contiguous slice of a global batch (sizes differ by at most one)."""
    return np.array_split(idx, w.size)[w.rank]


def wrap(model, w: World, strategy: str = "ddp"):
    """DDP around the model when distributed (`strategy` "ddp"), or FSDP2 applied to it in place ("fsdp": each
    transformer layer is one shard group, then the root); the model itself in one process.

    Call it before building the optimizer: FSDP replaces the parameters with their shards."""
    if not w.distributed:
        return model
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and strategy != "fsdp":
        from fmtune.errors import FmtuneError

        raise FmtuneError(
            f"accelerate launch was given an FSDP config (distributed_type: FSDP), but fmtune was asked for --distributed "
            f"{strategy}; fmtune's own loop does the sharding and reads only its own setting. Fix: add --distributed fsdp "
            f"(or train.distributed: fsdp in the YAML), or launch with a DDP config (docs/configs/accelerate_ddp.yaml)."
        )
    device = next(model.parameters()).device
    if strategy == "fsdp":
        return _fully_shard(model, w, device)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _layers(model) -> list:
    """The transformer layers to shard one by one: the classes transformers lists in `_no_split_modules` (the same
    ones accelerate's FSDP auto-wrap uses), else the items of every nn.ModuleList; innermost first."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT (LoRA) model
    names = set(getattr(base, "_no_split_modules", None) or ())
    modules = list(model.modules())[1:]
    layers = [m for m in modules if type(m).__name__ in names]
    if not layers:
        items = {id(m) for lst in modules if isinstance(lst, torch.nn.ModuleList) for m in lst}
        layers = [m for m in modules if id(m) in items]
    return layers[::-1]  # modules() lists parents before children; fully_shard must go bottom-up


def _fully_shard(model, w: World, device):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (w.size,))
    for layer in _layers(model):
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def sharded(model) -> bool:
    """Whether FSDP shards this model's parameters across the ranks (whole weights must then be gathered by all)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gather(tensors: dict, everywhere: bool = False) -> dict:
    """Whole tensors from a state dict of FSDP shards (DTensors): a collective every rank calls. The result is on CPU
    on rank 0 and empty elsewhere, or, with `everywhere`, on every rank's device. Plain tensors pass through."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    keep = everywhere or dist.get_rank() == 0
    out = {}
    for k, v in tensors.items():
        whole = v.full_tensor() if isinstance(v, DTensor) else v
        if keep:
            out[k] = whole if everywhere else whole.detach().cpu()
    return out


def scatter_like(tensors: dict, model) -> dict:
    """The inverse of `gather`: whole tensors (every rank holds them, e.g. read from a checkpoint) cut into the shards
    of `model`'s state dict, so `model.load_state_dict` takes them. A collective under FSDP; keys the model lacks pass."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    local = model.state_dict()
    out = {}
    for k, v in tensors.items():
        like = local.get(k)
        if isinstance(like, DTensor):
            out[k] = distribute_tensor(v.to(like.device, like.dtype), like.device_mesh, like.placements)
        else:
            out[k] = v.to(like.device) if like is not None else v
    return out


def unwrap(model):
    """The trained model as a plain, unsharded module on this rank's device: the model itself unless FSDP sharded it;
    under FSDP (a collective) its shards are gathered on every rank into a fresh copy of the same class, so saving,
    merging LoRA and serving work unchanged."""
    if not sharded(model):
        return model
    import torch

    whole = gather(model.state_dict(), everywhere=True)
    with torch.device("meta"):
        plain = _plain_copy(model)
    plain.load_state_dict(whole, strict=True, assign=True)
    for name, buf in list(plain.named_buffers()):  # non-persistent buffers (not in the state dict): FSDP leaves them whole
        if buf.is_meta:
            owner, _, leaf = name.rpartition(".")
            plain.get_submodule(owner).register_buffer(leaf, model.get_buffer(name).clone(), persistent=False)
    if hasattr(plain, "tie_weights"):  # assign=True loads tied weights as two tensors: tie them again
        plain.tie_weights()
    plain.train(model.training)
    return plain


def _plain_class(module):
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def _plain_copy(model):
    """A new, unsharded module of the model's class and config (weights still to be loaded)."""
    if hasattr(model, "get_base_model"):  # a PEFT (LoRA) model: the same adapter on a fresh base
        from peft import get_peft_model

        return get_peft_model(_plain_copy(model.get_base_model()), model.peft_config["default"])
    return _plain_class(model)(model.config)


def zero_loss(forward, input_ids, attention_mask):
    """A loss of zero that still takes part in the gradient exchange, for a rank whose slice of a global batch is empty
    (a global batch smaller than the number of ranks). DDP and FSDP both exchange gradients from hooks that their
    forward pass arms, so it is one row forwarded through the wrapped model and multiplied by zero; a backward pass
    without a forward would leave the other ranks waiting in the exchange forever."""
    return forward(input_ids=input_ids, attention_mask=attention_mask).logits.float().sum() * 0.0


def all_sum(value, w: World):
    """Sum a tensor over ranks (a no-op in one process)."""
    if w.distributed:
        import torch.distributed as dist

        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier(w: World) -> None:
    if w.distributed:
        import torch.distributed as dist

        dist.barrier()


def launch_command(nproc: int, argv: list[str]) -> list[str]:
    """torchrun on this machine with `nproc` processes, running the same fmtune command without --nproc."""
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    return [torchrun, "--standalone", f"--nproc_per_node={nproc}", "-m", "fmtune.cli", *argv]
