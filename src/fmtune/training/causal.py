"""Training a causal LM (generation, or classification answered with the label word), LoRA or full: the loss on the
completion tokens as a task of fmtune.training.loop, the loop every task kind shares (early stopping on validation loss,
checkpoints and resume, DDP)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from fmtune.config import TrainConfig
from fmtune.errors import FmtuneError
from fmtune.models.causal_lm import IGNORE, PACK_ROW_TOKENS, Encoded, collate, collate_packed, completion_nll, pack, token_losses
from fmtune.training.distributed import World


def fit(
    model,
    train: list[Encoded],
    validation: list[Encoded],
    cfg: TrainConfig,
    *,
    pad_id: int,
    learning_rate: float,
    seed: int,
    bf16: bool,
    lora: bool,
    eval_batch_size: int = 32,
    progress: Callable[[int, dict], None] | None = None,
    checkpoint_dir: Path | None = None,
    world: World | None = None,
):
    """Train on the completion tokens with early stopping on validation loss; returns fmtune.training.train.TrainResult with the
    best epoch's weights (LoRA merged into a plain transformers model, the adapter kept beside it). Rows whose `weight`
    is not 1 weigh their tokens in the loss by it (class weights); validation loss stays unweighted.

    The loop is fmtune.training.loop's, the encoder's too: with `checkpoint_dir` it checkpoints as checkpoint.Policy says and
    resumes from the newest checkpoint to the same result as an uninterrupted run; under torchrun (`world`, a
    fmtune.training.distributed.World with size > 1) each rank trains on its slice of every global batch inside DDP, the loss
    normalised by the global batch's scored tokens, so the weights are those of one process; only rank 0 writes."""
    from fmtune.training import loop
    from fmtune.training.train import TrainResult

    world = world or World()
    if world.distributed and getattr(cfg, "distributed", "ddp") == "fsdp":
        raise FmtuneError("--distributed fsdp: causal-LM training runs under DDP only (its loss calls the decoder and the output layer "
                          "directly, outside FSDP's root module). Fix: --distributed ddp, or --method lora to fit a larger model per process.")
    model = loop.start(model, cfg, seed, lora, "CAUSAL_LM")
    task, tokens = _completion_task(model, train, validation, cfg, pad_id, eval_batch_size, bf16, world)
    run = loop.train(model, task, cfg, seed=seed, learning_rate=learning_rate, bf16=bf16, world=world, checkpoint_dir=checkpoint_dir, progress=progress)
    model, adapter = loop.finish(run.model, lora)
    shared = run.levers
    levers = {"bf16": bf16, "bf16_weights": shared["bf16_weights"], "length_bucketing": cfg.length_bucketing, "dynamic_padding": True,
              "fused_optimizer": shared["fused_optimizer"], "fused_step": shared["fused_step"], "torch_compile": False, "lora": lora,
              "packing": bool(getattr(cfg, "packing", False)), "padding_share": round(1 - tokens["real"] / max(tokens["computed"], 1), 4),
              "loss_on_completion_only": True, "output_layer_on_scored_positions_only": True, "example_weights": tokens["weighted"],
              "fast_dropout": shared["fast_dropout"]}
    return TrainResult(model, run.history, run.best_epoch, len(run.history), run.steps, run.seconds, run.stopped, levers, adapter, run.real_tokens)


def _completion_task(model, train: list[Encoded], validation: list[Encoded], cfg: TrainConfig, pad_id: int, eval_batch_size: int, bf16: bool, world: World):
    """The loss on the completion tokens (per-row `weight`s when any is not 1), normalised by the scored tokens of the
    whole global batch (counted from the labels, the same on every rank); validation loss, lower is better. Returns the
    task and the counters of the positions computed and the real tokens among them on this rank (the padding share)."""
    import torch

    from fmtune.training import loop

    device = next(model.parameters()).device
    packing = bool(getattr(cfg, "packing", False))
    weights = torch.tensor([r.weight for r in train], dtype=torch.float32, device=device)
    # scored (predicted) tokens per example: the labels after the first position that are not IGNORE, packed or not
    scored = torch.tensor([sum(t != IGNORE for t in r.labels[1:]) for r in train], dtype=torch.long, device=device)
    tokens = {"computed": 0, "real": 0, "weighted": bool((weights != 1).any())}

    def batch_of(idx: np.ndarray) -> dict:
        rows = [train[i] for i in idx]
        if packing:  # the batch's examples packed into rows of PACK_ROW_TOKENS (or its longest example) (collate_packed)
            sizes = [len(r.input_ids) for r in rows]
            return {k: v.to(device) for k, v in collate_packed(rows, pack(sizes, max(max(sizes), PACK_ROW_TOKENS)), pad_id).items()}
        return {k: v.to(device) for k, v in collate(rows, pad_id).items()}

    def loss(forward, idx: np.ndarray, local: np.ndarray):
        if not len(local):  # a global batch smaller than the number of ranks: take part in the gradient average with zero
            sums, _ = forward(batch_of(idx[:1]))
            return sums.sum() * 0.0, torch.zeros((), device=device)
        batch = batch_of(local)
        tokens["computed"] += int(batch["input_ids"].numel())
        tokens["real"] += sum(len(train[i].input_ids) for i in local)
        sums, counts = forward(batch)
        rows, everyone = torch.as_tensor(local, device=device), torch.as_tensor(idx, device=device)
        if tokens["weighted"]:
            w = weights[rows]
            total = (sums * w).sum() / (scored[everyone] * weights[everyone]).sum().clamp(min=1e-8)
        else:
            total = sums.sum() / scored[everyone].sum().clamp(min=1)
        return total * world.size, sums.sum().detach()  # DDP averages the ranks' gradients: times the ranks, the global mean

    def validate(runner):
        val_loss = float(completion_nll(runner, validation, pad_id, eval_batch_size, bf16).mean())
        return {"val_loss": round(val_loss, 5)}, (-val_loss, val_loss)

    n_scored = max(int(scored.sum()), 1)
    lengths = np.array([len(r.input_ids) for r in train])
    return loop.Task(lengths, loss, lambda total: float(total / n_scored), validate, "validation loss", module=_scoring_module), tokens


def _scoring_module(model):
    """`model` as a module whose forward is token_losses: the module DDP wraps (its forward arms the gradient exchange),
    since the loss calls the decoder and the output layer, not the model's own forward."""
    import torch

    class CompletionLosses(torch.nn.Module):
        def __init__(self, inner) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, batch: dict):
            return token_losses(self.inner, batch)

    return CompletionLosses(model)
