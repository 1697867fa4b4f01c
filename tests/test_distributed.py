"""Multi-process training: 2 processes on CPU (gloo), under DDP and under FSDP, match one process with the same global
batch; FSDP checkpoints resume; the committed launcher configs are valid for accelerate."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from fmtune.training.distributed import World, _layers, launch_command, shard

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_reviews, write_csv  # noqa: E402

# dropout 0 and fp32: the only difference between 1 and 2 processes is the order of float additions in the gradient
# average (DDP's all-reduce, FSDP's reduce-scatter), so the weights agree to float32 rounding noise accumulated over the
# steps. Measured on this tiny BERT: 2.6e-5 (DDP) and 3.1e-5 (FSDP); the tolerance leaves a 30x margin.
ARGS = ["--epochs", "4", "--patience", "4", "--learning-rate", "3e-3", "--batch-size", "16", "--dropout", "0", "--bf16", "off",
        "--threads", "1", "--bootstrap", "100", "--latency-repeats", "3", "--no-curve", "--rungs", "zero_shot,few_shot,fine_tuned,from_scratch"]
ATOL = 1e-3
# 208 reviews split into 145 training rows = 9 batches of 16 and a last batch of ONE: with 2 processes, one rank's slice of
# that batch is empty every epoch, and it must still take part in the gradient exchange (DDP and FSDP differ there).
ROWS = 208
REPO = Path(__file__).resolve().parents[1]


def _cmd(data: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fmtune.cli", "run", "--data", str(data), "--model", str(model), "--out", str(out), *ARGS, *extra]


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run to the end; a hang (ranks waiting on each other) fails the test and kills torchrun and every rank with it."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"no result after {timeout} s (ranks waiting on each other?): {(out + err)[-3000:]}")
    assert proc.returncode == 0, (out + err)[-3000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_bert) -> tuple[Path, Path]:
    """The reference: one process on the whole of every global batch (shared by the DDP and FSDP tests)."""
    root = tmp_path_factory.mktemp("one-process")
    data = write_csv(root / "reviews.csv", make_reviews(ROWS))
    out = root / "runs" / "one"
    _run(_cmd(data, tiny_bert, out), root)
    return data, out


def _fine_tuned(run: Path) -> dict:
    return next(r for r in json.loads((run / "report.json").read_text())["ladder"] if r["name"] == "fine_tuned")


def _assert_matches(one: Path, two: Path) -> float:
    """Same saved model (a plain transformers folder, same keys) to ATOL, same training curve; returns the worst gap."""
    a = load_file(str(one / "model" / "model.safetensors"))
    b = load_file(str(two / "model" / "model.safetensors"))
    assert sorted(a) == sorted(b), "the saved model has the same tensors as a one-process run"
    assert json.loads((one / "model" / "config.json").read_text())["architectures"] == json.loads((two / "model" / "config.json").read_text())["architectures"]
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < ATOL, f"weights differ by up to {worst}"
    fa, fb = _fine_tuned(one), _fine_tuned(two)
    assert fb["metrics"]["macro_f1"] > 0.8, "2-process training converges on the easy task"
    assert abs(fa["metrics"]["macro_f1"] - fb["metrics"]["macro_f1"]) <= 0.02
    assert len(fa["history"]) == len(fb["history"])
    for ha, hb in zip(fa["history"], fb["history"]):
        assert abs(ha["train_loss"] - hb["train_loss"]) < 1e-3 and abs(ha["val_loss"] - hb["val_loss"]) < 1e-3
    return worst


def test_shard_covers_the_global_batch_in_order():
    idx = np.arange(7)
    parts = [shard(idx, World(r, 2, r)) for r in range(2)]
    assert np.concatenate(parts).tolist() == idx.tolist() and [len(p) for p in parts] == [4, 3]
    assert [len(shard(np.arange(1), World(r, 2, r))) for r in range(2)] == [1, 0]


def test_launch_command_wraps_torchrun():
    cmd = launch_command(2, ["run", "--data", "x.csv"])
    assert cmd[0].endswith("torchrun") and "--standalone" in cmd and "--nproc_per_node=2" in cmd and cmd[-3:] == ["run", "--data", "x.csv"]


def test_fsdp_shards_each_transformer_layer_innermost_first():
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32))
    names = [type(m).__name__ for m in _layers(model)]
    assert sorted(names) == ["BertEmbeddings", "BertLayer", "BertLayer"]
    assert _layers(model)[0] is model.bert.encoder.layer[1], "bottom-up: later (deeper in modules()) first"


def test_two_processes_match_one(tmp_path, tiny_bert, one_process):
    data, one = one_process
    _run(_cmd(data, tiny_bert, tmp_path / "runs" / "two", "--nproc", "2"), tmp_path)

    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["two"], "only rank 0 writes a run folder"
    rows = sqlite3.connect(tmp_path / "registry.sqlite").execute("select name, status from runs").fetchall()
    assert rows == [("two", "complete")]
    worst = _assert_matches(one, tmp_path / "runs" / "two")
    print(f"DDP, 2 processes vs 1: weights differ by up to {worst:.2e}")


def test_fsdp_two_processes_match_one(tmp_path, tiny_bert, one_process):
    data, one = one_process
    two = tmp_path / "runs" / "fsdp"
    _run(_cmd(data, tiny_bert, two, "--nproc", "2", "--distributed", "fsdp"), tmp_path)

    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["fsdp"], "only rank 0 writes a run folder"
    assert yaml.safe_load((two / "config.yaml").read_text())["train"]["distributed"] == "fsdp"
    worst = _assert_matches(one, two)
    print(f"FSDP, 2 processes vs 1: weights differ by up to {worst:.2e}")


def _kill_mid_training(cmd: list[str], cwd: Path, partial: Path) -> None:
    """SIGKILL torchrun and both ranks once a mid-epoch checkpoint of the fine-tuned rung exists."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    latest = partial / "checkpoints" / "fine_tuned" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and int(json.loads(latest.read_text())["checkpoint"].split("-")[1]) >= 5:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "training finished before it could be killed: " + (proc.stderr.read() if proc.stderr else "")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_fsdp_lora_killed_then_resumed_matches_one_process(tmp_path, tiny_bert):
    """LoRA under FSDP (frozen base shards beside trainable adapters), killed mid-epoch and resumed under FSDP from the
    gathered checkpoint, ends where one uninterrupted process does."""
    data = write_csv(tmp_path / "reviews.csv", make_reviews(ROWS))
    lora = ["--rungs", "zero_shot,fine_tuned", "--method", "lora", "--lora-dropout", "0", "--learning-rate", "3e-4"]
    one = tmp_path / "runs" / "one"
    _run(_cmd(data, tiny_bert, one, *lora), tmp_path)

    resumed = tmp_path / "runs" / "resumed"
    fsdp = _cmd(data, tiny_bert, resumed, *lora, "--checkpoint-every", "3", "--nproc", "2", "--distributed", "fsdp")
    partial = resumed.parent / ".resumed.partial"
    _kill_mid_training(fsdp, tmp_path, partial)
    assert partial.is_dir() and not resumed.exists()
    steps = partial / "checkpoints" / "fine_tuned"
    assert all((step / "state.json").is_file() for step in steps.glob("step-*")), "no half-deleted checkpoint keeps a step-* name"
    saved = load_file(str(steps / json.loads((steps / "latest").read_text())["checkpoint"] / "trainable.safetensors"))
    assert saved and all("lora_" in k or "classifier" in k for k in saved), "a LoRA checkpoint holds the adapter and the head, gathered whole"
    again = _run(fsdp, tmp_path)
    assert "Resuming" in again.stdout + again.stderr

    a = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and max(float((a[k] - b[k]).abs().max()) for k in a) < ATOL
    a = load_file(str(one / "model" / "model.safetensors"))
    b = load_file(str(resumed / "model" / "model.safetensors"))
    assert sorted(a) == sorted(b) and max(float((a[k] - b[k]).abs().max()) for k in a) < ATOL
    assert [h["train_loss"] for h in _fine_tuned(one)["history"]] == pytest.approx([h["train_loss"] for h in _fine_tuned(resumed)["history"]], abs=1e-3)


@pytest.mark.parametrize("name", ["accelerate_ddp.yaml", "accelerate_fsdp.yaml"])
def test_accelerate_configs_are_valid(name):
    """Every committed accelerate config loads with accelerate's own loader (unknown top-level keys are errors there)
    and its fsdp_config keys are options `accelerate launch` knows."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    path = REPO / "docs" / "configs" / name
    config = ClusterConfig.from_yaml_file(path)
    raw = yaml.safe_load(path.read_text())
    options = {a.dest for a in launch_command_parser()._actions}
    unknown = [k for k in (raw.get("fsdp_config") or {}) if (k if k.startswith("fsdp_") else "fsdp_" + k) not in options]
    assert not unknown, f"{name}: fsdp_config keys accelerate launch does not know: {unknown}"
    assert config.num_processes >= 2 and config.mixed_precision == "no", "fmtune's --bf16 decides precision, not accelerate"
    if name == "accelerate_fsdp.yaml":
        assert str(config.distributed_type.value) == "FSDP" and raw["fsdp_config"]["fsdp_version"] == 2


def test_accelerate_deepspeed_launch_is_refused(monkeypatch):
    from fmtune.errors import FmtuneError
    from fmtune.training.distributed import init

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(FmtuneError, match="--distributed fsdp"):
        init("cpu")


def test_accelerate_fsdp_launch_without_distributed_fsdp_is_refused(monkeypatch):
    from fmtune.errors import FmtuneError
    from fmtune.training.distributed import wrap

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(FmtuneError, match="add --distributed fsdp"):
        wrap(torch.nn.Linear(2, 2), World(0, 2, 0), "ddp")
