import numpy as np
import torch

from fmtune.training import checkpoint


def _model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def _step(model, opt):
    x = torch.randn(16, 4)
    loss = torch.nn.functional.cross_entropy(torch.nn.functional.dropout(model(x), 0.5), torch.randint(0, 2, (16,)))
    loss.backward()
    opt.step()
    opt.zero_grad()


def test_roundtrip_continues_exactly(tmp_path):
    model, opt = _model_and_optimizer()
    for _ in range(3):
        _step(model, opt)
    rng = np.random.default_rng(5)
    state = checkpoint.TrainState(step=3, epoch=1, batch=3, epoch_rng=rng.bit_generator.state, history=[{"epoch": 0}])
    best = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoint.save(tmp_path, model, opt, state, best)
    for _ in range(2):
        _step(model, opt)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model2, opt2 = _model_and_optimizer(seed=99)  # different init: everything must come from the checkpoint
    path = checkpoint.latest(tmp_path)
    restored, best2 = checkpoint.load(path, model2, opt2)
    assert restored.step == 3 and restored.history == [{"epoch": 0}] and best2 is not None
    gen = np.random.default_rng()
    gen.bit_generator.state = restored.epoch_rng
    assert gen.integers(1 << 30) == np.random.default_rng(5).integers(1 << 30)
    for _ in range(2):
        _step(model2, opt2)
    for k in expected:
        assert torch.equal(expected[k], model2.state_dict()[k]), k


def test_only_complete_checkpoints_are_used_and_old_ones_pruned(tmp_path):
    model, opt = _model_and_optimizer()
    _step(model, opt)
    checkpoint.save(tmp_path, model, opt, checkpoint.TrainState(step=1), None)
    checkpoint.save(tmp_path, model, opt, checkpoint.TrainState(step=2), None)
    assert [p.name for p in tmp_path.glob("step-*")] == ["step-0000002"]
    (tmp_path / ".tmp-step-0000003").mkdir()  # a checkpoint interrupted while being written
    assert checkpoint.latest(tmp_path).name == "step-0000002"
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.bin"))


def test_a_prune_cut_short_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    """Old checkpoints leave the step-* names atomically before their files go; a kill in the middle of deleting
    (simulated by an rmtree that does nothing) leaves only an .old-* folder, which the next save clears."""
    model, opt = _model_and_optimizer()
    _step(model, opt)
    checkpoint.save(tmp_path, model, opt, checkpoint.TrainState(step=1), None)
    real_rmtree = checkpoint.shutil.rmtree
    monkeypatch.setattr(checkpoint.shutil, "rmtree", lambda *a, **k: None)
    checkpoint.save(tmp_path, model, opt, checkpoint.TrainState(step=2), None)
    assert [p.name for p in tmp_path.glob("step-*")] == ["step-0000002"]
    assert [p.name for p in tmp_path.glob(".old-*")] == [".old-step-0000001"]
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    checkpoint.save(tmp_path, model, opt, checkpoint.TrainState(step=3), None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-0000003"]


def test_done_marker_roundtrip(tmp_path):
    model, _ = _model_and_optimizer()
    checkpoint.mark_done(tmp_path, model, {"best_epoch": 2})
    result, weights = checkpoint.load_done(tmp_path)
    assert result == {"best_epoch": 2} and set(weights) == set(model.state_dict())


def test_streamed_safetensors_round_trip_every_dtype(tmp_path):
    """checkpoint.write_safetensors writes the standard format: safetensors' own loader reads back every dtype, 0-d
    and empty tensors and non-contiguous views, bit for bit."""
    import torch
    from safetensors.torch import load_file

    from fmtune.training import checkpoint

    base = torch.randn(5, 7)
    tensors = {
        "f32": base, "bf16": base.to(torch.bfloat16), "f16": base.half(), "f64": base.double(), "i64": torch.arange(6).view(2, 3),
        "i32": torch.arange(4, dtype=torch.int32), "u8": torch.arange(3, dtype=torch.uint8), "bool": base > 0, "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4), "view": base.t(), "step": torch.tensor(7),
    }
    checkpoint.write_safetensors(tensors, tmp_path / "t.safetensors")
    back = load_file(str(tmp_path / "t.safetensors"))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k
