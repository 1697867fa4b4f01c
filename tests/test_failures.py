"""The common real failures, injected: NaN loss, out of memory, disk full while checkpointing, Ctrl-C."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fmtune.config import TrainConfig
from fmtune.errors import FmtuneError
from fmtune.models import loading
from fmtune.training import checkpoint, train


def _tiny_job(tiny_bert):
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_reviews

    tok = loading.load_tokenizer(tiny_bert)
    rows = make_reviews(64)
    ids = train.token_ids(tok, [r[0] for r in rows], 32)
    y = np.array([r[1] == "pos" for r in rows], dtype=np.int64)
    return loading.load_classifier(tiny_bert, ["neg", "pos"]), tok, (ids, y), (ids[:16], y[:16])


def test_nan_loss_stops_with_the_step_and_a_fix(tiny_bert):
    model, tok, tr, va = _tiny_job(tiny_bert)
    with torch.no_grad():
        model.classifier.weight.fill_(float("nan"))
    with pytest.raises(FmtuneError) as err:
        train.fit(model, tok, tr, va, TrainConfig(epochs=1), learning_rate=1e-3, n_classes=2, seed=0, bf16=False)
    msg = str(err.value)
    assert "training loss became nan in epoch 1 (between steps 1 and 2" in msg and "lower --learning-rate" in msg


def test_out_of_memory_suggests_smaller_batches(tiny_bert, monkeypatch):
    model, tok, tr, va = _tiny_job(tiny_bert)

    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(model, "forward", boom)
    with pytest.raises(FmtuneError) as err:
        train.fit(model, tok, tr, va, TrainConfig(epochs=1, batch_size=16), learning_rate=1e-3, n_classes=2, seed=0, bf16=False)
    msg = str(err.value)
    assert "out of memory at training step 1" in msg and "--batch-size (now 16)" in msg and "--method lora" in msg and "--max-length" in msg


def test_disk_full_while_checkpointing_keeps_the_last_good_one(tmp_path, monkeypatch):
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters())
    checkpoint.save(tmp_path, model, opt, checkpoint.TrainState(step=1), None)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_safetensors", full)
    with pytest.raises(FmtuneError) as err:
        checkpoint.save(tmp_path, model, opt, checkpoint.TrainState(step=2), None)
    assert "disk full" in str(err.value) and "step-0000001" in str(err.value) and "--resume" in str(err.value)
    assert checkpoint.latest(tmp_path).name == "step-0000001"
    assert not list(tmp_path.glob(".tmp-*"))


def test_ctrl_c_checkpoints_then_exits_cleanly_with_the_resume_command(tmp_path, tiny_bert):
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_reviews, write_csv

    data = write_csv(tmp_path / "reviews.csv", make_reviews(400))
    out = tmp_path / "runs" / "r"
    cmd = [sys.executable, "-m", "fmtune.cli", "run", "--data", str(data), "--model", str(tiny_bert), "--out", str(out), "--epochs", "30",
           "--patience", "30", "--batch-size", "4", "--checkpoint-every", "0", "--checkpoint-seconds", "0", "--threads", "1", "--no-curve", "--bf16", "off",
           "--rungs", "zero_shot,few_shot,fine_tuned,from_scratch", "--bootstrap", "100", "--latency-repeats", "3"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    latest = out.parent / ".r.partial" / "checkpoints" / "fine_tuned" / "latest"
    deadline = time.time() + 300
    while not latest.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None
    first = json.loads(latest.read_text())["checkpoint"]
    time.sleep(0.3)  # mid-epoch: --checkpoint-seconds 0 writes only at epoch ends, so a new checkpoint comes from Ctrl-C
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "--resume" in stderr
    partial = out.parent / ".r.partial"
    assert "status: interrupted" in (partial / "STATUS").read_text() and not out.exists()
    assert json.loads(latest.read_text())["checkpoint"] != first, "Ctrl-C writes a checkpoint where training stopped"
