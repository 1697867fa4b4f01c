"""The real packaged SmolLM2: GGUF -> cached HF folder (written once, reused), chat generation, a few LoRA steps."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fmtune import causal_lm, gen_data
from fmtune.config import DataConfig, TrainConfig

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
    data = gen_data.chatterbot_jsonl(0, examples=40)
    splits = gen_data.load_pairs(DataConfig(data=data), 0)
    tok = causal_lm.load_tokenizer(smollm2)
    train = [causal_lm.encode(tok, p.chat(), p.completion, 96) for p in splits.train[:16]]
    val = [causal_lm.encode(tok, p.chat(), p.completion, 96) for p in splits.validation]
    model = causal_lm.load_model(smollm2)
    before = causal_lm.completion_nll(model, train, tok.pad_token_id, 16, False).mean()
    cfg = TrainConfig(epochs=2, batch_size=8, patience=2, warmup_ratio=0.0)
    result = causal_lm.fit(model, train, val, cfg, pad_id=tok.pad_token_id, learning_rate=2e-3, seed=0, bf16=False, lora=True)
    after = causal_lm.completion_nll(result.model, train, tok.pad_token_id, 16, False).mean()
    assert result.steps == 4 and result.adapter is not None
    assert after < before - 0.2, (before, after)
    assert np.isfinite(result.history[-1]["val_loss"])
