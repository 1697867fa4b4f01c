"""The real packaged SmolLM2: GGUF -> cached HF folder (written once, reused), chat generation, a few LoRA steps."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fmtune.config import DataConfig, TrainConfig
from fmtune.data import pairs
from fmtune.models import causal_lm
from fmtune.training import causal

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fmtune-cache")


@pytest.fixture(scope="module")
def smollm2(cache) -> Path:
    return causal_lm.smollm2_folder(cache)


def test_gguf_is_converted_once_and_reused(smollm2, cache):
    assert smollm2.parent == cache / "models" and (smollm2 / "model.safetensors").is_file() and (smollm2 / "config.json").is_file()
    assert not list(smollm2.parent.glob(".*tmp-*")), "the temporary folder must be renamed into place"
    written = (smollm2 / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    again = causal_lm.smollm2_folder(cache)
    assert again == smollm2 and (smollm2 / "model.safetensors").stat().st_mtime_ns == written
    assert time.perf_counter() - start < 10  # only the GGUF's sha256, no conversion
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config


def test_smollm2_answers_in_its_chat_template(smollm2):
    tok = causal_lm.load_tokenizer(smollm2)
    assert "<|im_start|>" in tok.chat_template
    model = causal_lm.load_model(smollm2)
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    out = causal_lm.generate(model, tok, [[{"role": "user", "content": "What is the capital of France?"}]], max_new_tokens=12)
    assert "paris" in out[0].lower()


def test_a_few_lora_steps_lower_the_loss_on_chatterbot_pairs(smollm2, tmp_path, monkeypatch):
    import numpy as np

    monkeypatch.setenv("FMTUNE_CACHE", str(tmp_path))
    data = pairs.chatterbot_jsonl(0, examples=40)
    splits = pairs.load_pairs(DataConfig(data=data), 0)
    tok = causal_lm.load_tokenizer(smollm2)
    train = [causal_lm.encode(tok, p.chat(), p.completion, 96) for p in splits.train[:16]]
    val = [causal_lm.encode(tok, p.chat(), p.completion, 96) for p in splits.validation]
    model = causal_lm.load_model(smollm2)
    before = causal_lm.completion_nll(model, train, tok.pad_token_id, 16, False).mean()
    cfg = TrainConfig(epochs=2, batch_size=8, patience=2, warmup_ratio=0.0)
    result = causal.fit(model, train, val, cfg, pad_id=tok.pad_token_id, learning_rate=2e-3, seed=0, bf16=False, lora=True)
    after = causal_lm.completion_nll(result.model, train, tok.pad_token_id, 16, False).mean()
    assert result.steps == 4 and result.adapter is not None
    assert after < before - 0.2, (before, after)
    assert np.isfinite(result.history[-1]["val_loss"])


def test_word_forms_questions_are_balanced_one_word_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("FMTUNE_CACHE", str(tmp_path))
    sections = pairs.word_forms_pairs()
    assert set(sections) == set(pairs.WORD_FORMS_QUESTIONS) and all(len(v) >= 20 for v in sections.values())
    path = pairs.word_forms_jsonl(0, 140)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 140 and len({r["prompt"] for r in rows}) == 140
    assert all(len(r["completion"].split()) == 1 for r in rows)
    per_section = {name: sum(r["prompt"] in {q for q, _ in pairs} for r in rows) for name, pairs in sections.items()}
    assert all(n == 10 for name, n in per_section.items() if not name.startswith("capital"))  # round robin: 140 / 14 sections
    assert per_section["capital-world"] >= 10  # the two capital sections share questions ("What is the capital of Greece?")
    assert ("What is the plural of 'banana'?", "bananas") in sections["gram8-plural"]
    assert pairs.word_forms_jsonl(0, 140) == path and path.stat().st_size > 0


def test_generation_quickstart_end_to_end_on_a_subset(tmp_path):
    """`fmtune quickstart --task generation` on 70 word-form questions: the whole ladder, a valid report, and the
    fine-tuned model answering in the one-word form that the base model does not use."""
    import os
    import subprocess
    import sys

    import jsonschema

    out = tmp_path / "gen"
    proc = subprocess.run([sys.executable, "-m", "fmtune.cli", "quickstart", "--task", "generation", "--examples", "70", "--no-curve", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=1800, env={**os.environ, "FMTUNE_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    schema = json.loads((Path(__file__).parents[1] / "src" / "fmtune" / "schema" / "report.schema.json").read_text())
    jsonschema.validate(report, schema)
    rungs = {r["name"]: r for r in report["ladder"]}
    assert list(rungs) == ["zero_shot", "few_shot", "fine_tuned", "from_scratch"] and report["task"]["primary_metric"] == "exact_match"
    assert rungs["fine_tuned"]["metrics"]["exact_match"] > rungs["zero_shot"]["metrics"]["exact_match"]
    assert all(len(r["ci95"]["exact_match"]) == 2 for r in rungs.values())
    assert report["levers"]["bf16_weights"] in (None, "autocast", "bf16 copy of the weights, fp32 master weights")


def test_fmtune_serve_answers_v1_generate_on_a_smollm2_run(smollm2, cache, tmp_path, monkeypatch):
    """`fmtune run` on 40 word-form questions (SmolLM2 + LoRA, 1 epoch, no learning curve: about 90 s on 2 cores),
    then `fmtune serve` on the run folder: the generation model is served and POST /v1/generate answers."""
    import os
    import subprocess
    import sys

    from fastapi.testclient import TestClient
    from test_cli import AUTH, serve_through_the_cli

    monkeypatch.setenv("FMTUNE_CACHE", str(tmp_path / "cache"))
    data = pairs.word_forms_jsonl(0, 40)
    run = tmp_path / "runs" / "smol"
    env = {**os.environ, "FMTUNE_CACHE": str(cache), "FMTUNE_REGISTRY": str(tmp_path / "registry.sqlite")}  # cache: the converted SmolLM2
    proc = subprocess.run([sys.executable, "-m", "fmtune.cli", "run", "--data", str(data), "--model", "smollm2", "--task", "generation", "--method", "lora",
                           "--epochs", "1", "--no-curve", "--bootstrap", "100", "--latency-repeats", "3", "--few-shot-k", "1", "--max-new-tokens", "4",
                           "--metric", "exact_match", "--out", str(run), "--name", "smol"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    app = serve_through_the_cli(run, tmp_path, monkeypatch)["app"]
    with TestClient(app) as client:
        r = client.post("/v1/generate", json={"prompts": ["What is the plural of 'banana'?"], "max_new_tokens": 8}, headers=AUTH)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "smol" and len(body["completions"]) == 1 and body["completions"][0].strip()
        assert client.get("/v1/model", headers=AUTH).json()["task"] == "generation"
