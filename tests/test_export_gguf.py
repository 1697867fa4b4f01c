"""`export_gguf`: a tiny generation run's Llama written to GGUF, read back by transformers' GGUF loader and checked on
the run's test prompts; f32, f16 and q8_0; the manifest covers it; failures keep no file; other runs are refused."""

from __future__ import annotations

import json
import shutil
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

import fmtune
from fmtune.errors import FmtuneError
from fmtune.models import causal_lm
from fmtune.serving import export, gguf_export
from fmtune.store import lineage

gguf = pytest.importorskip("gguf")

COLOURS = ["red", "blue", "green", "white", "black", "brown", "pink", "grey"]
ANIMALS = ["fox", "cat", "dog", "owl", "cow", "bee"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2


def colour_rows() -> list[dict]:
    return [{"prompt": f"what colour is the {c} {a}", "completion": c} for a in ANIMALS for c in COLOURS]


def make_tiny_llama_bpe(folder: Path, tie: bool = True, train_steps: int = 200, seed: int = 0) -> Path:
    """A 2-layer, hidden-64 Llama (4 heads, 2 key/value heads) with a byte-level BPE tokenizer trained on a few
    sentences, SmolLM2's special tokens and its ChatML template, trained for `train_steps` full-batch steps on the
    colour questions so that its greedy answers have the margins of a real model (a random one ties at every step)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rows = colour_rows()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [f"{r['prompt']} {r['completion']}" for r in rows] + ["You are a helpful AI assistant named SmolLM, trained by Hugging Face", "system user assistant"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
                                   pad_token="<|im_end|>", model_max_length=256)
    fast.chat_template = causal_lm.CHATML_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=tok.get_vocab_size() + 4, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=tie)
    model = LlamaForCausalLM(config)  # 4 embedding rows no token uses: written as llama.cpp's [PAD<i>] tokens
    if train_steps:
        batch = causal_lm.collate([causal_lm.encode(fast, [{"role": "user", "content": r["prompt"]}], r["completion"]) for r in rows], 2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tensors this small train faster on one thread (and much faster on a busy machine)
        try:
            for _ in range(train_steps):
                loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        finally:
            torch.set_num_threads(threads)
    folder.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(folder, safe_serialization=True)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """One finished tiny generation run for the module; tests that change it work on a copy."""
    root = tmp_path_factory.mktemp("gguf-run")
    llama = make_tiny_llama_bpe(root / "tiny-llama-bpe")
    data = root / "colours.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in colour_rows()))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        result = fmtune.run(data=data, model=str(llama), out=str(root / "runs" / "gen"), epochs=1, curve=False, rungs=["zero_shot", "fine_tuned"],
                            bootstrap=100, latency_repeats=3, quiet=True)
    return Path(result.run_dir)


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory) -> tuple[Path, dict]:
    """A copy of the tiny run exported to f16, then q8_0 (read-only for the tests that use it)."""
    run_dir = shutil.copytree(tiny_run, tmp_path_factory.mktemp("gguf-exported") / tiny_run.name)
    return run_dir, {"f16": export.export_gguf(run_dir), "q8_0": export.export_gguf(run_dir, quantization="q8_0")}


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    return shutil.copytree(run_dir, tmp_path / run_dir.name)


def fields(path: Path) -> tuple[dict, dict]:
    """(metadata {key: value}, tensors {name: ReaderTensor}) of a GGUF file."""
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}, {t.name: t for t in reader.tensors}


def test_f16_and_q8_0_exports_pass_and_are_covered_by_the_manifest(exported):
    run_dir, records = exported
    report = json.loads((run_dir / "report.json").read_text())
    f16, q8 = records["f16"], records["q8_0"]
    assert sorted(p.name for p in (run_dir / "export").iterdir()) == ["export-gguf-f16.json", "export-gguf-q8_0.json", "model-f16.gguf", "model-q8_0.gguf"]
    for record, quant in ((f16, "f16"), (q8, "q8_0")):
        path = run_dir / "export" / f"model-{quant}.gguf"
        assert json.loads((run_dir / "export" / f"export-gguf-{quant}.json").read_text()) == record
        assert record["format"] == "gguf" and record["quantization"] == quant and record["file"] == f"export/model-{quant}.gguf" and record["passed"]
        assert record["sha256"] == lineage.sha256_file(path) and record["bytes"] == path.stat().st_size and record["gguf_version"] == version("gguf")
        assert record["test_prompts"] == report["data"]["test"] and record["max_new_tokens"] == report["task"]["max_new_tokens"]
        assert record["answer_agreement"] == 1.0 and record["next_token_agreement"] == 1.0 and record["tokenizer_agreement"] == 1.0
        assert record["chat_template_round_trip"] and record["thresholds"] == {"min_agreement": 0.95} and record["answers_that_differ"] == []
        assert record["tensors"]["output_weight"].startswith("not written") and record["tensors"]["count"] == 1 + 2 * 9 + 1
        assert record["tokenizer"]["pre"] == "gpt-2" and record["tokenizer"]["chat_template"] == "the model folder's"
    assert 1e-4 < f16["max_next_token_logit_diff"] < 0.05 and f16["max_next_token_logit_diff"] < q8["max_next_token_logit_diff"] < 0.5
    assert f16["tensors"]["types"] == {"F16": 15, "F32": 5} and q8["tensors"]["types"] == {"F32": 5, "Q8_0": 15}
    assert q8["bytes"] < 0.65 * f16["bytes"]

    result = lineage.check_run(run_dir)  # what `fmtune verify` runs
    assert result.problems == [] and not any("export" in note for note in result.notes)
    manifest = lineage.load_manifest(run_dir)
    assert "export" in manifest["covers"]["folders"] and set(manifest["exports"]["gguf"]) == {"f16", "q8_0"}
    assert manifest["exports"]["gguf"]["q8_0"]["sha256"] == q8["sha256"] == manifest["outputs"]["export/model-q8_0.gguf"]
    assert manifest["outputs"]["export/model-f16.gguf"] == f16["sha256"], "the f16 export is still covered after the q8_0 one"

    meta, tensors = fields(run_dir / "export" / "model-q8_0.gguf")
    config = json.loads((run_dir / "model" / "config.json").read_text())
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert (meta["llama.context_length"], meta["llama.embedding_length"], meta["llama.block_count"], meta["llama.feed_forward_length"]) == (256, 64, 2, 128)
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"], meta["llama.rope.dimension_count"]) == (4, 2, 16)
    assert meta["llama.rope.freq_base"] == config["rope_parameters"]["rope_theta"] and meta["llama.vocab_size"] == config["vocab_size"]
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"])
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2" and len(meta["tokenizer.ggml.tokens"]) == config["vocab_size"]
    assert meta["tokenizer.ggml.tokens"][:3] == SPECIAL and list(meta["tokenizer.ggml.token_type"][:4]) == [3, 3, 3, 1]
    assert meta["tokenizer.ggml.tokens"][-1] == f"[PAD{config['vocab_size'] - 1}]" and meta["tokenizer.ggml.token_type"][-1] == gguf.TokenType.UNUSED
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"], meta["tokenizer.ggml.padding_token_id"]) == (1, 2, 2)
    assert meta["tokenizer.ggml.add_bos_token"] is False and meta["tokenizer.chat_template"] == causal_lm.CHATML_TEMPLATE
    assert len(meta["tokenizer.ggml.merges"]) > 0 and "output.weight" not in tensors and tensors["blk.0.attn_q.weight"].tensor_type.name == "Q8_0"
    assert tensors["output_norm.weight"].tensor_type.name == "F32"


def test_the_cli_exports_gguf_with_its_quantization(tiny_run, tmp_path):
    from typer.testing import CliRunner

    from fmtune.cli import app

    run_dir = copy_run(tiny_run, tmp_path)
    out = CliRunner().invoke(app, ["export", str(run_dir), "--format", "gguf", "--quantization", "q8_0"])
    assert out.exit_code == 0, out.output
    assert "greedy-answer agreement 1.0000" in out.output and (run_dir / "export" / "model-q8_0.gguf").is_file()
    bad = CliRunner().invoke(app, ["export", str(run_dir), "--format", "gguf", "--quantization", "q2_k"])
    assert bad.exit_code != 0 and "q2_k" in str(bad.exception)


def test_f32_round_trips_exactly_through_the_q_k_permutation(tiny_run, tmp_path):
    run_dir = copy_run(tiny_run, tmp_path)
    record = export.export_gguf(run_dir, quantization="f32")
    assert record["passed"] and record["max_next_token_logit_diff"] < 1e-5 and record["answer_agreement"] == 1.0
    model = causal_lm.load_model(run_dir / "model")
    _, tensors = fields(run_dir / "export" / "model-f32.gguf")
    q = model.state_dict()["model.layers.0.self_attn.q_proj.weight"].numpy()
    stored = tensors["blk.0.attn_q.weight"].data
    assert (stored == gguf_export.permute(q, 4, 4)).all() and not (stored == q).all(), "q_proj is stored permuted, as llama.cpp stores it"
    back, _ = gguf_export.load(run_dir / "export", "model-f32.gguf")
    ours, theirs = model.state_dict(), back.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours), "transformers' loader undoes the permutation"
    assert back.config.tie_word_embeddings


def test_untied_embeddings_write_output_weight(tmp_path):
    folder = make_tiny_llama_bpe(tmp_path / "untied", tie=False, train_steps=0)
    tokenizer_json = gguf_export.check_model(folder)
    model, tokenizer = causal_lm.load_model(folder).eval(), causal_lm.load_tokenizer(folder)
    written = gguf_export.write(model, tokenizer, folder, tokenizer_json, tmp_path / "m.gguf", "f32", "untied")
    assert written["tensors"]["output_weight"].startswith("written") and "output.weight" in fields(tmp_path / "m.gguf")[1]
    back, back_tokenizer = gguf_export.load(tmp_path, "m.gguf")
    assert not back.config.tie_word_embeddings and torch.equal(back.lm_head.weight, model.lm_head.weight)
    found = gguf_export.compare(model, tokenizer, back, back_tokenizer, ["what colour is the red fox", "zebra 42"], 4)
    assert found["max_next_token_logit_diff"] < 1e-5 and found["answer_agreement"] == 1.0 and found["tokenizer_agreement"] == 1.0


def test_a_failing_export_keeps_no_gguf_file_and_reports_its_numbers(exported, tmp_path, monkeypatch):
    run_dir = copy_run(exported[0], tmp_path)
    real_load = gguf_export.load

    def broken(folder, name):  # a file whose last norm is wrong: the loaded-back model's logits are not the run's
        model, tokenizer = real_load(folder, name)
        with torch.no_grad():
            model.model.norm.weight.mul_(-3.0)
        return model, tokenizer

    monkeypatch.setattr(gguf_export, "load", broken)
    with pytest.raises(FmtuneError, match=r"the GGUF q8_0 export failed its check on \d+ test prompts: greedy answer agreement") as err:
        export.export_gguf(run_dir, quantization="q8_0")
    assert "No GGUF file was kept" in str(err.value) and "at least 0.95 needed" in str(err.value)
    assert sorted(p.name for p in (run_dir / "export").iterdir()) == ["export-gguf-f16.json", "export-gguf-q8_0.json", "model-f16.gguf"], \
        "the failed file and the earlier q8_0 export are gone; the f16 export stays"
    record = json.loads((run_dir / "export" / "export-gguf-q8_0.json").read_text())
    assert record["passed"] is False and record["file"] is None and record["answer_agreement"] < 0.95 and record["answers_that_differ"]
    summaries = lineage.load_manifest(run_dir)["exports"]["gguf"]
    assert lineage.check_run(run_dir).problems == [] and summaries["q8_0"]["passed"] is False and summaries["f16"]["passed"] is True

    monkeypatch.setattr(gguf_export, "load", real_load)
    assert export.export_gguf(run_dir, quantization="q8_0")["passed"], "fmtune re-exports over its own failed export"
    assert lineage.check_run(run_dir).problems == []


def test_onnx_and_gguf_files_share_export_and_foreign_files_are_refused(tmp_path):
    """The folder rule both exports apply (a run has one or the other: ONNX is for encoder classifiers, GGUF for
    causal LMs): each file next to its fmtune record is kept; a file without one, or any other file, stops the export."""
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"onnx")
    (folder / "export.json").write_text(json.dumps({"format": "onnx", "passed": True}))
    (folder / "model-f16.gguf").write_bytes(b"GGUF")
    (folder / "export-gguf-f16.json").write_text(json.dumps({"format": "gguf", "quantization": "f16", "passed": True}))
    (folder / ".gguf-crashed").mkdir()
    (folder / ".export-gguf-f16.json.abc.tmp").write_text("{")
    export._check_export_folder(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["export-gguf-f16.json", "export.json", "model-f16.gguf", "model.onnx"], "crash leftovers go"

    (folder / "model-q8_0.gguf").write_bytes(b"someone else's model")
    with pytest.raises(FmtuneError, match=r"model-q8_0\.gguf: exists and was not written by fmtune \(no export-gguf-q8_0\.json"):
        export._check_export_folder(folder)
    (folder / "export-gguf-q8_0.json").write_text(json.dumps({"format": "gguf", "quantization": "f16"}))  # another quantisation's record
    with pytest.raises(FmtuneError, match="was not written by fmtune"):
        export._check_export_folder(folder)
    assert (folder / "model-q8_0.gguf").read_bytes() == b"someone else's model"
    for name in ("model-q8_0.gguf", "export-gguf-q8_0.json"):
        (folder / name).unlink()
    (folder / "model-q4_0.gguf").write_bytes(b"x")
    with pytest.raises(FmtuneError, match=r"holds files fmtune did not write \(model-q4_0\.gguf\)"):
        export._check_export_folder(folder)


def test_runs_gguf_cannot_hold_are_refused(tiny_run, tmp_path):
    from test_generation import make_tiny_llama

    run_dir = copy_run(tiny_run, tmp_path)
    with pytest.raises(FmtuneError, match=r"quantization 'q4_k': expected one of f32, f16, q8_0 \(f32: every tensor"):
        export.export_gguf(run_dir, quantization="q4_k")
    report = json.loads((run_dir / "report.json").read_text())
    for task, says in (({"type": "classification"}, "this is a classification run"),
                       ({"type": "classification", "model_kind": "causal_lm"}, "classifies with a causal LM")):
        (run_dir / "report.json").write_text(json.dumps({**report, "task": task}))
        with pytest.raises(FmtuneError, match=f"GGUF export is for generation runs .*{says}"):
            export.export_gguf(run_dir)
    (run_dir / "report.json").write_text(json.dumps(report))
    config = json.loads((run_dir / "model" / "config.json").read_text())
    (run_dir / "model" / "config.json").write_text(json.dumps({**config, "model_type": "mistral", "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(FmtuneError, match="architecture MistralForCausalLM: GGUF export supports LlamaForCausalLM"):
        export.export_gguf(run_dir)
    assert not (run_dir / "export").exists()
    (run_dir / "model" / "config.json").write_text(json.dumps({**config, "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 128, "rope_theta": 1e4}}))
    with pytest.raises(FmtuneError, match="rope scaling 'llama3'"):
        export.export_gguf(run_dir)
    with pytest.raises(FmtuneError, match="tokenizer WordLevel: GGUF export writes llama.cpp's 'gpt2' tokenizer"):
        gguf_export.check_model(make_tiny_llama(tmp_path / "word-level"))


@pytest.mark.integration
def test_smollm2_is_written_as_llama_cpp_wrote_its_packaged_gguf_and_round_trips(tmp_path):
    """The real SmolLM2 weights (not a run: a finished SmolLM2 run costs minutes of CPU) against the GGUF that
    llama.cpp's converter made of the same model (the packaged Q4_1 file): the same tensors and shapes, the same
    hyperparameters and vocabulary; then read back by transformers and compared on a few prompts."""
    folder = causal_lm.smollm2_folder(tmp_path / "cache")
    tokenizer_json = gguf_export.check_model(folder)
    model, tokenizer = causal_lm.load_model(folder).eval(), causal_lm.load_tokenizer(folder)
    written = gguf_export.write(model, tokenizer, folder, tokenizer_json, tmp_path / "smollm2.gguf", "q8_0", "smollm2", "smollm2")
    ours, our_tensors = fields(tmp_path / "smollm2.gguf")
    theirs, their_tensors = fields(causal_lm.smollm2_gguf())
    same = [k for k in theirs if k.startswith(("llama.", "tokenizer.")) and k not in ("tokenizer.ggml.pre", "tokenizer.ggml.add_space_prefix")]
    assert len(same) > 15 and {k: ours[k] for k in same} == {k: theirs[k] for k in same}
    assert theirs["tokenizer.ggml.pre"] == "smollm" and ours["tokenizer.ggml.pre"] == "gpt-2", "the run's tokenizer (as transformers rebuilt it) splits by GPT-2's regex"
    assert {n: t.shape.tolist() for n, t in our_tensors.items()} == {n: t.shape.tolist() for n, t in their_tensors.items()}
    assert written["tensors"]["count"] == 272 and written["tensors"]["types"] == {"F32": 61, "Q8_0": 211}
    q = gguf.dequantize(our_tensors["blk.0.attn_k.weight"].data, gguf.GGMLQuantizationType.Q8_0)
    reference = gguf.dequantize(their_tensors["blk.0.attn_k.weight"].data, their_tensors["blk.0.attn_k.weight"].tensor_type)
    assert float(abs(q - reference).max()) < 0.05, "k_proj is permuted as llama.cpp permutes it (9 heads, 3 key/value heads)"
    back, back_tokenizer = gguf_export.load(tmp_path, "smollm2.gguf")
    found = gguf_export.compare(model, tokenizer, back, back_tokenizer, ["What is the capital of France?", "What is the plural of 'mouse'?"], 8)
    assert found["tokenizer_agreement"] == 1.0 and found["next_token_agreement"] == 1.0 and found["answer_agreement"] == 1.0, found
