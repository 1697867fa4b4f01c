"""Kill a real training process with SIGKILL mid-run, resume, and get exactly the uninterrupted result (CPU, 1 thread)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ARGS = ["--epochs", "4", "--patience", "4", "--learning-rate", "3e-3", "--batch-size", "8", "--checkpoint-every", "3",
        "--threads", "1", "--bootstrap", "100", "--latency-repeats", "3", "--no-curve", "--rungs", "zero_shot,few_shot,fine_tuned,from_scratch",
        "--bf16", "off"]


def _cmd(data: Path, model: Path, out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "fmtune.cli", "run", "--data", str(data), "--model", str(model), "--out", str(out), *ARGS, *extra]


def _kill_mid_training(cmd: list[str], cwd: Path, partial: Path) -> None:
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    latest = partial / "checkpoints" / "fine_tuned" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file():
            step = int(json.loads(latest.read_text())["checkpoint"].split("-")[1])
            if step >= 5:  # past the first epoch's first checkpoints, mid-training
                break
        time.sleep(0.005)
    assert proc.poll() is None, "training finished before it could be killed: " + (proc.stderr.read() if proc.stderr else "")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("method", ["full", "lora"])
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, tiny_bert, method):
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_reviews, write_csv

    data = write_csv(tmp_path / "reviews.csv", make_reviews(200))
    extra = ["--method", method]
    reference = tmp_path / "runs" / "reference"
    done = subprocess.run(_cmd(data, tiny_bert, reference, extra), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    resumed = tmp_path / "runs" / "resumed"
    partial = resumed.parent / ".resumed.partial"
    _kill_mid_training(_cmd(data, tiny_bert, resumed, extra), tmp_path, partial)
    assert partial.is_dir() and not resumed.exists(), "a killed run must never look finished"
    again = subprocess.run(_cmd(data, tiny_bert, resumed, extra), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Resuming" in again.stderr
    assert not partial.exists()

    a = load_file(str(reference / "model" / "model.safetensors"))
    b = load_file(str(resumed / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra = json.loads((reference / "report.json").read_text())
    rb = json.loads((resumed / "report.json").read_text())
    ft = lambda r: next(x for x in r["ladder"] if x["name"] == "fine_tuned")  # noqa: E731
    assert ft(ra)["metrics"] == ft(rb)["metrics"]
    assert [h["train_loss"] for h in ft(ra)["history"]] == [h["train_loss"] for h in ft(rb)["history"]]
