"""Data-parallel training: 2 processes on CPU (gloo) match one process with the same global batch."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from fmtune.distributed import World, launch_command, shard

# dropout 0 and fp32: the only difference between 1 and 2 processes is the order of float additions in the gradient
# average, so the weights agree to float32 rounding noise accumulated over the steps (tolerance below).
ARGS = ["--epochs", "4", "--patience", "4", "--learning-rate", "3e-3", "--batch-size", "16", "--dropout", "0", "--bf16", "off",
        "--threads", "1", "--bootstrap", "100", "--latency-repeats", "3", "--no-curve", "--rungs", "zero_shot,few_shot,fine_tuned,from_scratch"]
ATOL = 1e-3


def test_shard_covers_the_global_batch_in_order():
    idx = np.arange(7)
    parts = [shard(idx, World(r, 2, r)) for r in range(2)]
    assert np.concatenate(parts).tolist() == idx.tolist() and [len(p) for p in parts] == [4, 3]


def test_launch_command_wraps_torchrun():
    cmd = launch_command(2, ["run", "--data", "x.csv"])
    assert cmd[0].endswith("torchrun") and "--standalone" in cmd and "--nproc_per_node=2" in cmd and cmd[-3:] == ["run", "--data", "x.csv"]


def test_two_processes_match_one(tmp_path, tiny_bert):
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_reviews, write_csv

    data = write_csv(tmp_path / "reviews.csv", make_reviews(200))
    base = [sys.executable, "-m", "fmtune.cli", "run", "--data", str(data), "--model", str(tiny_bert), *ARGS]
    one = subprocess.run(base + ["--out", str(tmp_path / "runs" / "one")], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(base + ["--out", str(tmp_path / "runs" / "two"), "--nproc", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]

    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["one", "two"], "only rank 0 writes a run folder"
    rows = sqlite3.connect(tmp_path / "registry.sqlite").execute("select name, status from runs").fetchall()
    assert sorted(rows) == [("one", "complete"), ("two", "complete")]

    a = load_file(str(tmp_path / "runs" / "one" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "runs" / "two" / "model" / "model.safetensors"))
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < ATOL, f"weights differ by up to {worst}"
    ra, rb = (json.loads((tmp_path / "runs" / n / "report.json").read_text()) for n in ("one", "two"))
    fa, fb = (next(r for r in x["ladder"] if r["name"] == "fine_tuned") for x in (ra, rb))
    assert fb["metrics"]["macro_f1"] > 0.8, "2-process training converges on the easy task"
    assert abs(fa["metrics"]["macro_f1"] - fb["metrics"]["macro_f1"]) <= 0.02
    for ha, hb in zip(fa["history"], fb["history"]):
        assert abs(ha["train_loss"] - hb["train_loss"]) < 1e-3
