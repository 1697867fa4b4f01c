"""Generation runs train under torchrun too: 2 processes on CPU (gloo) give the same LoRA fine-tune as one process with
the same global batch, and only rank 0 writes a run folder."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import _run  # noqa: E402
from test_generation import colour_pairs, make_tiny_llama, write_jsonl  # noqa: E402

# fp32, no dropout (the model's and LoRA's): 1 and 2 processes differ only in the order of float additions of the gradient average
ARGS = ["--epochs", "3", "--patience", "3", "--lora-learning-rate", "1e-2", "--batch-size", "8", "--dropout", "0", "--lora-dropout", "0", "--bf16", "off", "--threads", "1",
        "--bootstrap", "100", "--latency-repeats", "3", "--no-curve", "--max-new-tokens", "3", "--few-shot-k", "1", "--rungs", "zero_shot,fine_tuned"]
ATOL = 1e-3


def _cmd(data: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fmtune.cli", "run", "--data", str(data), "--model", str(model), "--out", str(out), *ARGS, *extra]


def test_generation_two_processes_match_one(tmp_path):
    model = make_tiny_llama(tmp_path / "tiny-llama")
    # 45 pairs -> 31 training pairs = 3 batches of 8 and a last batch of 7: one rank's slice is smaller
    data = write_jsonl(tmp_path / "colours.jsonl", colour_pairs(45))
    _run(_cmd(data, model, tmp_path / "runs" / "one"), tmp_path)
    _run(_cmd(data, model, tmp_path / "runs" / "two", "--nproc", "2"), tmp_path)

    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["one", "two"], "only rank 0 writes a run folder"
    rows = sqlite3.connect(tmp_path / "registry.sqlite").execute("select name, status from runs order by name").fetchall()
    assert rows == [("one", "complete"), ("two", "complete")], "one registry row per run: rank 1 records nothing"
    one, two = tmp_path / "runs" / "one", tmp_path / "runs" / "two"
    a, b = load_file(str(one / "model" / "model.safetensors")), load_file(str(two / "model" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < ATOL, f"weights differ by up to {worst}"
    assert (two / "adapter" / "adapter_model.safetensors").is_file()
    ha, hb = ([r for r in json.loads((run / "report.json").read_text())["ladder"] if r["name"] == "fine_tuned"][0]["history"] for run in (one, two))
    assert len(ha) == len(hb) and all(abs(x["train_loss"] - y["train_loss"]) < 1e-3 and abs(x["val_loss"] - y["val_loss"]) < 1e-3 for x, y in zip(ha, hb))
    print(f"generation, DDP, 2 processes vs 1: weights differ by up to {worst:.2e}")
