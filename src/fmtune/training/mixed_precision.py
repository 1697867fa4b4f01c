"""Two levers of the training step that touch every parameter: bf16 weights with fp32 masters, and a sparse embedding
gradient. Both keep AdamW's update (every row of every weight still steps) and only change how the step gets there.

bf16 weights (`Bf16Copy`). Autocast keeps the model in fp32 and casts at every op boundary: each weight to bf16 in
every forward, activations back to fp32 around every LayerNorm, softmax and loss, gradients back to fp32 for every
parameter. Here forward and backward run on a bf16 copy of the model instead (the "master weights" recipe of mixed
precision training): the optimizer, the checkpoints and the returned model keep the fp32 weights; after each backward
the bf16 gradients are cast into one flat fp32 buffer (one multi-tensor copy), clipped with one norm, the optimizer
steps the fp32 weights, and the bf16 copy is refreshed from them in one multi-tensor copy. Frozen weights (LoRA's base
model) are cast once, not in every forward. The input embedding stays fp32 and shared (its output is cast to bf16).

Sparse embedding gradient (`SparseEmbeddingGrad`). The input embedding of a small encoder is half its parameters
(MiniLM: 11.7M of 22.7M), but a batch of 32 short texts touches ~1k of its 30k rows. Its dense gradient is allocated,
zero-filled (page faults included: the buffer is fresh every step), scattered into and reduced every step: ~10 ms of
a ~200 ms step on a 2-core CPU. With the embedding's gradient computed sparse (`nn.Embedding.sparse`), autograd adds
the touched rows into one persistent dense fp32 buffer that the optimizer reads as the gradient; after the step it is
zeroed in place. AdamW sees the same dense gradient, so the update is the same as with a dense embedding gradient.

Trained embedding rows (`EmbeddingRows`). AdamW still steps every row of that embedding every step, yet a row whose
token never occurs in the training data has a zero gradient at every step, so its moments stay zero and its update is
weight decay alone: w <- w * (1 - lr_t * wd). Its value after n steps is known in closed form, w0 * prod(1 - lr_t * wd).
The training data is tokenised before training, so the rows that can ever get a gradient are known up front (MiniLM
on 2,000 review snippets: 7.8k of 30.5k). Training runs on an embedding of those rows only (token ids renumbered), and
the other rows get their decay once when the full table is put back: AdamW's update exactly, on a quarter of the rows.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn

from fmtune.models.loading import without_adapter


def _input_embedding(model: nn.Module) -> nn.Embedding | None:
    base = without_adapter(model)
    get = getattr(base, "get_input_embeddings", None)
    try:
        emb = get() if get is not None else None
    except (NotImplementedError, AttributeError):
        return None
    return emb if isinstance(emb, nn.Embedding) else None


def _tied(model: nn.Module, param: nn.Parameter) -> bool:
    """Whether `param` is used by more than one module of `model` (an input embedding tied to the output layer)."""
    return sum(p is param for _, p in model.named_parameters(remove_duplicate=False)) > 1


def _param_name(model: nn.Module, param: nn.Parameter) -> str | None:
    return next((n for n, p in model.named_parameters() if p is param), None)


class SparseEmbeddingGrad:
    """The input embedding's gradient accumulated sparse into a persistent dense fp32 buffer (see the module docstring).
    A hook notes which rows each backward touched, so the gradient's norm, its clipping and its zeroing after the
    optimizer step read and write those rows only. Call `zero()` instead of setting its `.grad` to None."""

    def __init__(self, module: nn.Embedding) -> None:
        self.module = module
        self.param = module.weight
        module.sparse = True
        self.buffer = torch.zeros_like(self.param, dtype=torch.float32)
        self.param.grad = self.buffer  # autograd adds each step's sparse gradient into it in place
        self._rows: list[torch.Tensor] = []
        self._unique: torch.Tensor | None = None  # rows() of the current _rows, computed once per step
        self._dense = False  # a dense gradient arrived (sparse was turned off somewhere): fall back to whole-buffer ops
        self._hook = self.param.register_hook(self._note_rows)

    def _note_rows(self, grad: torch.Tensor) -> torch.Tensor:
        if grad.is_sparse:
            self._rows.append(grad._indices()[0])
            self._unique = None
        else:
            self._dense = True
        return grad

    @classmethod
    def install(cls, model: nn.Module) -> "SparseEmbeddingGrad | None":
        """On the model's trainable fp32 input embedding; None when it has none (or it is frozen, as under LoRA)."""
        emb = _input_embedding(model)
        if emb is None or not emb.weight.requires_grad or emb.weight.dtype != torch.float32 or emb.max_norm is not None:
            return None
        return cls(emb)

    def rows(self) -> torch.Tensor | None:
        """The rows with a gradient since the last zero(); None when every row must be treated as touched."""
        if self._dense:
            return None
        if self._unique is None:
            self._unique = torch.unique(torch.cat(self._rows)) if self._rows else self.buffer.new_zeros(0, dtype=torch.long)
        return self._unique

    def norm(self, rows: torch.Tensor | None) -> torch.Tensor:
        if rows is None:
            return torch.linalg.vector_norm(self.buffer)
        return torch.linalg.vector_norm(self.buffer.index_select(0, rows))

    def scale(self, rows: torch.Tensor | None, coef: torch.Tensor) -> None:
        if rows is None:
            self.buffer.mul_(coef)
        else:
            self.buffer.index_copy_(0, rows, self.buffer.index_select(0, rows) * coef)

    def zero(self) -> None:
        rows = self.rows()
        if rows is None:
            self.buffer.zero_()
        else:
            self.buffer.index_fill_(0, rows, 0.0)
        self._rows.clear()
        self._unique = None
        self._dense = False
        self.param.grad = self.buffer

    def remove(self) -> None:
        self._hook.remove()
        self.module.sparse = False
        self.param.grad = None


class EmbeddingRows:
    """Train only the input-embedding rows that the training (and validation) tokens use; see the module docstring.

    `install` swaps the model's input embedding for one holding those rows (`rows`, sorted token ids) and returns the
    helper, or None where the lever does not apply (frozen or tied embedding, or most rows in use anyway). Renumber
    token ids with `renumber` before they reach the model. `uninstall(decay)` writes the trained rows back into the
    full table, multiplies every other row by `decay` (the product of 1 - lr_t * weight_decay over the steps taken),
    and puts the full embedding back."""

    MAX_SHARE = 0.5  # with more of the vocabulary in use the saving is too small to be worth renumbering

    def __init__(self, parent: nn.Module, leaf: str, original: nn.Embedding, rows: torch.Tensor) -> None:
        self.parent, self.leaf, self.original, self.rows = parent, leaf, original, rows
        self.lookup = np.full(original.num_embeddings, -1, dtype=np.int64)  # token id -> row of the trained embedding
        self.lookup[rows.numpy()] = np.arange(len(rows))
        padding = int(self.lookup[original.padding_idx]) if original.padding_idx is not None else None
        with torch.no_grad():  # given its weight, the module draws no random init (the torch RNG stream stays as it was)
            weight = original.weight.index_select(0, rows.to(original.weight.device))
        self.module = nn.Embedding(len(rows), original.embedding_dim, padding_idx=padding, _weight=weight)
        self.module.train(original.training)
        setattr(parent, leaf, self.module)

    @classmethod
    def install(cls, model: nn.Module, token_ids: list, always: list[int | None]) -> "EmbeddingRows | None":
        emb = _input_embedding(model)
        if emb is None or not emb.weight.requires_grad or emb.weight.dtype != torch.float32 or emb.max_norm is not None or type(emb) is not nn.Embedding:
            return None
        if _tied(model, emb.weight):
            return None  # tied to the output layer, which scores every row
        used = np.zeros(emb.num_embeddings, dtype=bool)
        for ids in token_ids:
            for row in ids:
                used[np.asarray(row, dtype=np.int64)] = True
        for i in always + [emb.padding_idx]:
            if i is not None and 0 <= i < emb.num_embeddings:
                used[i] = True
        if used.mean() > cls.MAX_SHARE:
            return None
        name = next((n for n, m in model.named_modules() if m is emb), "")
        parent_path, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_path)
        if not leaf or getattr(parent, leaf, None) is not emb:
            return None
        return cls(parent, leaf, emb, torch.from_numpy(np.flatnonzero(used)))

    def renumber(self, ids):
        """Token ids (a numpy array or a list of lists) as rows of the trained embedding."""
        if isinstance(ids, np.ndarray):
            return self.lookup[ids]
        return [self.lookup[np.asarray(row, dtype=np.int64)].tolist() for row in ids]

    def info(self) -> dict:
        return {"trained_rows": len(self.rows), "vocabulary": self.original.num_embeddings}

    def uninstall(self, decay: float) -> None:
        with torch.no_grad():
            full = self.original.weight
            full.mul_(decay)
            full.index_copy_(0, self.rows.to(full.device), self.module.weight.to(full.dtype))
        self.original.train(self.module.training)
        setattr(self.parent, self.leaf, self.original)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, sparse: SparseEmbeddingGrad | None = None) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (global L2 norm, coefficient max_norm / (norm + 1e-6) when above 1), with the
    embedding in `sparse` read and scaled on its touched rows only, and no multiply when nothing needs clipping."""
    grads = [p.grad for p in params if p.grad is not None and (sparse is None or p is not sparse.param)]
    norms = list(torch._foreach_norm(grads, 2, dtype=torch.float32)) if grads else []
    rows = sparse.rows() if sparse is not None else None
    if sparse is not None:
        norms.append(sparse.norm(rows))
    norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    coef = max_norm / (norm + 1e-6)
    if coef < 1:
        if grads:
            torch._foreach_mul_(grads, coef)
        if sparse is not None:
            sparse.scale(rows, coef)
    return norm


class Bf16Copy:
    """A bf16 compute copy of `master` whose trainable parameters' gradients feed the master's fp32 weights.

    Use: forward/backward on `.compute`, then `step(optimizer, max_norm)`: gradients clipped by their global norm, the
    optimizer's step on the fp32 weights, the bf16 copy refreshed from them. On CPU with a torch AdamW, that is one
    fused pass (fmtune.training.cpu_kernels) straight from the bf16 gradients; elsewhere (or with `fused_step=False`, or without
    a C compiler) the bf16 gradients are cast into the masters' flat fp32 `.grad` buffer, clipped, the optimizer steps
    and the copy is refreshed (`step_grads`, `optimizer.step()`, `refresh()`). `shared` parameters (the input
    embedding) are the master's own fp32 tensors inside the copy; their gradients arrive on the master directly and
    torch's optimizer steps them in both cases."""

    def __init__(self, master: nn.Module, dtype: torch.dtype = torch.bfloat16, share_input_embedding: bool = True, fused_step: bool = True) -> None:
        self.master = master
        emb = _input_embedding(master) if share_input_embedding else None
        if emb is not None and _tied(master, emb.weight):
            emb = None  # tied to the output layer: sharing it with one of its two users would untie them in the copy
        shared_name = _param_name(master, emb.weight) if emb is not None else None
        self.compute = copy.deepcopy(master).to(dtype)
        self.shared: list[nn.Parameter] = []
        self._hooks = []
        if shared_name is not None:
            module_path, _, leaf = shared_name.rpartition(".")
            target = self.compute.get_submodule(module_path)
            setattr(target, leaf, emb.weight)  # the very fp32 Parameter the optimizer steps: no copy, no cast
            self._hooks.append(target.register_forward_hook(lambda m, args, out: out.to(dtype)))
            self.shared.append(emb.weight)
        m_params, c_params = dict(master.named_parameters()), dict(self.compute.named_parameters())
        names = [n for n, p in m_params.items() if p.requires_grad and c_params.get(n) is not None and c_params[n] is not p]
        self.master_params = [m_params[n] for n in names]
        self.compute_params = [c_params[n] for n in names]
        on_cpu = all(p.device.type == "cpu" for p in self.master_params)
        self.kernel_status = "off (fused_step=False)" if not fused_step else ("only for bf16 copies on CPU" if dtype != torch.bfloat16 or not on_cpu else None)
        if self.kernel_status is None:
            from fmtune.training import cpu_kernels

            self.kernel_status = cpu_kernels.status() if cpu_kernels.library() is None else None
        self.kernel = self.kernel_status is None and bool(self.master_params)
        self.grad32: torch.Tensor | None = None
        self._grad_views: list[torch.Tensor] = []
        if not self.kernel:
            self._flat_grads()

    @property
    def step_lever(self) -> str:
        """What the report says of this copy's optimizer step."""
        return "one compiled pass: bf16 gradients -> AdamW on fp32 weights -> bf16 copy" if self.kernel else f"torch's passes: {self.kernel_status}"

    def _flat_grads(self) -> None:
        """The masters' `.grad` as views of one flat fp32 buffer (what the unfused step casts the bf16 gradients into)."""
        device = self.master_params[0].device if self.master_params else torch.device("cpu")
        self.grad32 = torch.zeros(sum(p.numel() for p in self.master_params), dtype=torch.float32, device=device)
        offset = 0
        for m in self.master_params:
            n = m.numel()
            view = self.grad32[offset : offset + n].view_as(m)
            m.grad = view
            self._grad_views.append(view)
            offset += n

    def _shared_grads(self, sparse: SparseEmbeddingGrad | None) -> tuple[torch.Tensor | None, list[torch.Tensor], list[torch.Tensor]]:
        """The shared parameters' gradients: (the sparse embedding's touched rows, the dense ones, their squared norms)."""
        rows = sparse.rows() if sparse is not None else None
        dense = [p.grad for p in self.shared if p.grad is not None and (sparse is None or p is not sparse.param)]
        squares = [g.dot(g) if g.is_contiguous() else g.square().sum() for g in (g.reshape(-1) for g in dense)]
        if sparse is not None:
            squares.append(sparse.norm(rows).square())
        return rows, dense, squares

    @staticmethod
    def _clip(norm: torch.Tensor, max_norm: float | None, optimizer, scale_here: list[torch.Tensor], sparse: SparseEmbeddingGrad | None, rows) -> float:
        """Clip to `max_norm` as torch.nn.utils.clip_grad_norm_ does. With a fused torch optimizer the coefficient goes
        to it as `grad_scale`, which its kernel divides every gradient by as it reads it (the hook torch's GradScaler
        uses); otherwise the gradients in `scale_here` and the sparse rows are scaled in place. Returns the coefficient
        (1.0 when nothing is clipped)."""
        fused = optimizer is not None and bool(optimizer.defaults.get("fused"))
        if fused:
            optimizer.grad_scale = None
        if max_norm is None:
            return 1.0
        coef = max_norm / (norm + 1e-6)
        if coef >= 1:
            return 1.0
        if fused:
            optimizer.grad_scale = (1.0 / coef).to(torch.float32)
        else:
            for g in scale_here:
                g.mul_(coef)
            if sparse is not None:
                sparse.scale(rows, coef)
        return float(coef)

    def step_grads(self, max_norm: float | None, sparse: SparseEmbeddingGrad | None = None, optimizer: torch.optim.Optimizer | None = None) -> torch.Tensor:
        """Cast the bf16 gradients into the masters' fp32 gradients and clip all gradients (shared ones included) to
        `max_norm` by their global norm (the norm of the flat fp32 buffer, which holds the bf16 values exactly); returns
        the norm before clipping. The bf16 gradients are released, so the next backward writes fresh ones instead of
        adding into old ones."""
        if self.grad32 is None:
            self._flat_grads()
        grads = [c.grad for c in self.compute_params]
        with torch.no_grad():
            present = [i for i, g in enumerate(grads) if g is not None]
            for i, g in enumerate(grads):
                if g is None:  # a parameter this batch did not reach
                    self._grad_views[i].zero_()
            torch._foreach_copy_([self._grad_views[i] for i in present], [grads[i] for i in present])
            # the sum of squares of the flat buffer as one BLAS dot: twice as fast as vector_norm's reduction here
            squares = [self.grad32.dot(self.grad32)] if self.master_params else []
            for c in self.compute_params:
                c.grad = None
            rows, dense, shared_squares = self._shared_grads(sparse)
            squares += shared_squares
            norm = torch.stack(squares).sum().sqrt() if squares else torch.zeros(())
            self._clip(norm, max_norm, optimizer, [self.grad32, *dense], sparse, rows)
        return norm

    def step(self, optimizer: torch.optim.Optimizer, max_norm: float | None, sparse: SparseEmbeddingGrad | None = None) -> torch.Tensor:
        """One optimizer step from the gradients of the last backward (clipped to `max_norm`); returns the norm before
        clipping. The bf16 copy holds the new weights afterwards."""
        setting = _kernel_setting(optimizer) if self.kernel else None
        if setting is None and self.kernel:  # the lever reports the path that ran
            self.kernel, self.kernel_status = False, f"{type(optimizer).__name__} with these settings is not the plain AdamW the kernel reproduces"
        if setting is None:
            norm = self.step_grads(max_norm, sparse, optimizer)
            optimizer.step()
            self.refresh()
            return norm
        from fmtune.training import cpu_kernels

        with torch.no_grad():
            present = [i for i, c in enumerate(self.compute_params) if c.grad is not None]  # torch skips unreached ones too
            grads = [self.compute_params[i].grad.contiguous() for i in present]
            rows, dense, squares = self._shared_grads(sparse)
            total = cpu_kernels.sum_of_squares(grads) if grads else 0.0
            norm = (torch.stack(squares).sum() + total).sqrt() if squares else torch.tensor(total, dtype=torch.float32).sqrt()
            coef = self._clip(norm, max_norm, optimizer, dense, sparse, rows)
            masters = [self.master_params[i] for i in present]
            states = [_adamw_state(optimizer.state[p], p) for p in masters]
            if states:
                torch._foreach_add_([s["step"] for s in states], 1.0)
                steps = torch.stack([s["step"] for s in states]).tolist()
                groups, (beta1, beta2), eps = setting
                lr_wd, step_size, root = [], [], []
                for p, t in zip(masters, steps):
                    lr = float(groups[id(p)]["lr"])
                    lr_wd.append(lr * groups[id(p)]["weight_decay"])
                    step_size.append(lr / (1 - beta1**t))
                    root.append(math.sqrt(1 - beta2**t))
                cpu_kernels.adamw_bf16(masters, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                                       [self.compute_params[i] for i in present], lr_wd, step_size, root, beta1, beta2, eps, coef)
            for c in self.compute_params:
                c.grad = None
        optimizer.step()  # the shared parameters (the masters above have no .grad, so torch's step passes them by)
        return norm

    def refresh(self) -> None:
        """The bf16 compute weights from the fp32 masters (after an optimizer step or loading a checkpoint)."""
        with torch.no_grad():
            if self.master_params:
                torch._foreach_copy_(self.compute_params, self.master_params)

    def sync_all(self) -> None:
        """Every float tensor of the compute copy from the master (after loading a whole state dict into the master)."""
        masters = dict(self.master.state_dict(keep_vars=True))
        with torch.no_grad():
            for name, t in self.compute.state_dict(keep_vars=True).items():
                if name in masters and t.is_floating_point() and t is not masters[name]:
                    t.copy_(masters[name])

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        for m in self.master_params:
            m.grad = None


def _kernel_setting(optimizer) -> tuple[dict, tuple[float, float], float] | None:
    """(param id -> param group, betas, eps) when `optimizer` is a plain torch AdamW with one beta/eps setting that the
    fused kernel reproduces (no amsgrad, maximize, capturable or differentiable); None otherwise."""
    if type(optimizer) is not torch.optim.AdamW:
        return None
    groups, settings = {}, set()
    for group in optimizer.param_groups:
        if group.get("amsgrad") or group.get("maximize") or group.get("capturable") or group.get("differentiable") or torch.is_tensor(group["lr"]):
            return None
        settings.add((tuple(group["betas"]), group["eps"]))
        groups.update({id(p): group for p in group["params"]})
    if len(settings) != 1:
        return None
    betas, eps = settings.pop()
    return groups, betas, eps


def _adamw_state(state: dict, param: torch.Tensor) -> dict:
    """torch AdamW's per-parameter state, created as torch creates it on a parameter's first step."""
    if not state:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return state
