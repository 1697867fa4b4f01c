"""The fused bf16 AdamW step (fmtune.training.cpu_kernels) against torch's passes, and its fallback without a compiler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fmtune.models import loading
from fmtune.training import cpu_kernels
from fmtune.training.mixed_precision import Bf16Copy

needs_kernel = pytest.mark.skipif(cpu_kernels.library() is None, reason=f"no fused kernel here: {cpu_kernels.status()}")


def _train(tiny_bert, fused_step: bool, steps: int, scale: float, max_norm: float | None = 1.0):
    """A few bf16-copy AdamW steps (two parameter groups, warm-up schedule) from the same synthetic gradients in every
    run: bf16 ones on the copy, an fp32 one on the shared input embedding."""
    torch.manual_seed(0)
    master = loading.load_classifier(tiny_bert, ["neg", "pos"], dropout=0.0)
    mp = Bf16Copy(master, fused_step=fused_step)
    params = [p for p in master.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1}, {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=5e-3, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    norms = []
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        for c in mp.compute_params:
            c.grad = (torch.randn(c.shape, generator=gen) * scale * 1e-2).to(torch.bfloat16)
        for p in mp.shared:
            p.grad = torch.randn(p.shape, generator=gen) * scale * 1e-3
        norms.append(float(mp.step(opt, max_norm)))
        for p in mp.shared:
            p.grad = None
        sched.step()
    return master, mp, opt, norms


@needs_kernel
@pytest.mark.parametrize("scale, max_norm", [(1.0, None), (50.0, 0.5)])
def test_fused_step_matches_torchs_passes(tiny_bert, scale, max_norm):
    """Same weights, moments, steps and clip norms as cast + norm + torch's fused AdamW + refresh (to fp32 rounding),
    with and without clipping; the bf16 copy is exactly the round-to-nearest-even of the new fp32 weights."""
    fused, mp_f, opt_f, norms_f = _train(tiny_bert, True, 4, scale, max_norm)
    plain, mp_p, opt_p, norms_p = _train(tiny_bert, False, 4, scale, max_norm)
    assert mp_f.kernel and not mp_p.kernel and mp_p.step_lever == "torch's passes: off (fused_step=False)"
    assert norms_f == pytest.approx(norms_p, rel=1e-5)
    if max_norm is not None:
        assert min(norms_f) > max_norm  # the clip was active
    for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        sa, sb = opt_f.state[a], opt_p.state[b]
        assert float(sa["step"]) == float(sb["step"]) == 4.0
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], rtol=1e-4, atol=1e-8, msg=name)
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=1e-4, atol=1e-10, msg=name)
    for m, c in zip(mp_f.master_params, mp_f.compute_params):
        assert torch.equal(c, m.detach().to(torch.bfloat16))
        assert m.grad is None and c.grad is None
    assert all(opt_f.state_dict()["state"][i].keys() == opt_p.state_dict()["state"][i].keys() for i in opt_p.state_dict()["state"])


def _one_step(tiny_bert, with_grad: slice, **adamw):
    """A bf16 copy and its AdamW (`adamw` settings) after one step from random gradients on `with_grad` of the copy's
    parameters; the master weights before the step."""
    torch.manual_seed(0)
    master = loading.load_classifier(tiny_bert, ["neg", "pos"], dropout=0.0)
    mp = Bf16Copy(master)
    opt = torch.optim.AdamW(master.parameters(), lr=1e-2, **adamw)
    before = [m.detach().clone() for m in mp.master_params]
    for c in mp.compute_params[with_grad]:
        c.grad = torch.randn(c.shape).to(torch.bfloat16)
    mp.step(opt, 1.0)
    return mp, opt, before


@needs_kernel
def test_an_optimizer_the_kernel_does_not_reproduce_steps_through_torch_and_the_lever_says_so(tiny_bert):
    mp, opt, before = _one_step(tiny_bert, slice(None), amsgrad=True)
    assert not mp.kernel and mp.step_lever.startswith("torch's passes: AdamW with these settings")
    assert all("max_exp_avg_sq" in opt.state[m] for m in mp.master_params)  # torch's amsgrad step ran
    assert all(not torch.equal(m, b) for m, b in zip(mp.master_params, before))
    assert all(torch.equal(c, m.detach().to(torch.bfloat16)) for m, c in zip(mp.master_params, mp.compute_params))


@needs_kernel
def test_a_parameter_without_a_gradient_is_left_alone_as_torch_leaves_it(tiny_bert):
    mp, opt, before = _one_step(tiny_bert, slice(None, -1), fused=True)
    untouched = mp.master_params[-1]
    assert mp.kernel and torch.equal(untouched, before[-1]) and untouched not in opt.state
    assert all(p in opt.state for p in mp.master_params[:-1])


@needs_kernel
def test_kernel_rounding_and_sum_of_squares_match_torch():
    torch.manual_seed(0)
    n = 10_007  # odd: the 16-wide loop and its tail, split across two threads mid-tensor
    p = torch.randn(n) * torch.logspace(-30, 30, n)
    # exact ties between two bf16 values (the low 16 bits 0x8000), both parities
    p[:64] = (torch.arange(64, dtype=torch.int32) * 65536 + 0x3F800000 + 0x8000).view(torch.float32)
    zeros = [torch.zeros(n), torch.zeros(n)]
    copy = torch.empty(n, dtype=torch.bfloat16)
    g = torch.zeros(n, dtype=torch.bfloat16)
    cpu_kernels.adamw_bf16([p], [g], [zeros[0]], [zeros[1]], [copy], [0.0], [0.0], [1.0], 0.9, 0.999, 1e-8, 1.0)
    assert torch.equal(copy, p.to(torch.bfloat16))
    grads = [torch.randn(k).to(torch.bfloat16) for k in (0, 1, 15, 16, 17, 4099)]
    expected = sum(float(t.double().square().sum()) for t in grads)
    assert cpu_kernels.sum_of_squares(grads) == pytest.approx(expected, rel=1e-6)


def test_halves_cover_every_element_once():
    for sizes in ([0], [5], [1, 1], [3, 0, 8, 1, 13], [100, 1, 1]):
        parts = cpu_kernels._halves(sizes)
        seen = [np.zeros(n, dtype=int) for n in sizes]
        for part in parts:
            for i, a, b in part:
                seen[i][a:b] += 1
        assert all((s == 1).all() for s in seen)
        counts = [sum(b - a for _, a, b in part) for part in parts]
        assert abs(counts[0] - counts[1]) <= 1


def test_without_a_compiler_training_uses_torchs_passes(tiny_bert, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: None)
    cpu_kernels._load.cache_clear()
    try:
        assert cpu_kernels.library() is None and "no C compiler" in cpu_kernels.status()
        master, mp, opt, norms = _train(tiny_bert, True, 2, 1.0)
        assert not mp.kernel and mp.step_lever.startswith("torch's passes: no C compiler")
        assert all(float(opt.state[p]["step"]) == 2.0 for p in mp.master_params)
    finally:
        cpu_kernels._load.cache_clear()


@needs_kernel
def test_the_library_is_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("FMTUNE_CACHE", str(tmp_path / "cache"))
    cpu_kernels._load.cache_clear()
    try:
        first = cpu_kernels.library()
        built = sorted((tmp_path / "cache" / "kernels").iterdir())
        assert [f.suffix for f in built] == [".so"] and first.path == built[0]  # no temporary files left behind
        cpu_kernels._load.cache_clear()
        mtime = built[0].stat().st_mtime_ns
        assert cpu_kernels.library().path == built[0] and built[0].stat().st_mtime_ns == mtime
    finally:
        cpu_kernels._load.cache_clear()
