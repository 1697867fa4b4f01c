"""Generation: data, masking, collation, generation, metrics, and the whole run through the CLI on a tiny random Llama."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fmtune.config import DataConfig
from fmtune.data import pairs
from fmtune.errors import DataError
from fmtune.evidence import gen_metrics
from fmtune.models import causal_lm
from fmtune.serving.predict import GenerationPredictor
from fmtune.training import causal

SCHEMA = json.loads((Path(__file__).parents[1] / "src" / "fmtune" / "schema" / "report.schema.json").read_text())
COLOURS = "red green blue yellow black white orange purple pink brown grey gold".split()
ANIMALS = "cat dog cow fox owl bee ant eel yak ram".split()
WORDS = ["colour", "of", "the", "a", "is", "what", "answer", "briefly", "you", "are", "helpful", "ai", "assistant", "named", "smollm", "trained", "by", "hugging", "face", ","] + COLOURS + ANIMALS
SPECIAL = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
ROLES = ["system", "user", "assistant"]


def make_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """A 2-layer, hidden-32 random Llama with a word-level tokenizer and a ChatML template, saved as safetensors."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys(SPECIAL + ROLES + WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>",
                                   additional_special_tokens=["<|im_start|>"], model_max_length=128)
    fast.chat_template = causal_lm.CHATML_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=128, pad_token_id=vocab["<pad>"], eos_token_id=vocab["<|im_end|>"], bos_token_id=vocab["<|im_start|>"], tie_word_embeddings=True)
    folder.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    fast.save_pretrained(folder)
    return folder


def colour_pairs(n: int) -> list[dict]:
    """'what colour is the red fox' -> 'red': unique pairs (up to 120), learnable by copying a word."""
    pairs = [(c, a) for a in ANIMALS for c in COLOURS]
    return [{"prompt": f"what colour is the {c} {a}", "completion": c} for c, a in pairs[:n]]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return causal_lm.load_tokenizer(tiny_llama)


# ---------------------------------------------------------------- metrics


def test_normalise_and_text_metrics_exact_values():
    assert gen_metrics.normalise("  The Cat, sat!  on a MAT. ") == "cat sat on mat"
    assert gen_metrics.exact_match("The cat.", "cat") == 1.0
    assert gen_metrics.exact_match("a dog", "cat") == 0.0
    # pred "cat sat mat" vs ref "cat sat on mat": common 3 -> P 1, R 3/4, F1 6/7
    assert gen_metrics.token_f1("the cat sat mat", "cat sat on the mat") == pytest.approx(6 / 7)
    # LCS of "x w y z" and "w x y z" is 3 -> P = R = 3/4
    assert gen_metrics.lcs_length("x w y z".split(), "w x y z".split()) == 3
    assert gen_metrics.rouge_l("x w y z", "w x y z") == pytest.approx(0.75)
    # order matters for ROUGE-L, not for token F1; articles do not count
    assert gen_metrics.token_f1("z y x w", "w x y z") == 1.0 and gen_metrics.rouge_l("z y x w", "w x y z") == pytest.approx(0.25)
    assert gen_metrics.rouge_l("the x y", "x a y") == 1.0
    assert gen_metrics.rouge_l("", "") == 1.0 and gen_metrics.rouge_l("", "x") == 0.0 and gen_metrics.rouge_l("x y", "z") == 0.0


def test_generation_metrics_means_cis_and_perplexity():
    boot = np.random.default_rng(0).integers(0, 4, size=(200, 4))
    m = gen_metrics.generation_metrics(["cat", "dog", "x y", "x"], ["cat", "cow", "x y z", "y"], np.log([2.0, 2.0, 8.0, 8.0]), boot, "rouge_l")
    assert m["metrics"]["exact_match"] == 0.25
    assert m["metrics"]["rouge_l"] == pytest.approx((1 + 0 + 0.8 + 0) / 4)
    assert m["metrics"]["perplexity"] == pytest.approx(4.0)
    lo, hi = m["ci95"]["rouge_l"]
    assert 0 <= lo <= m["metrics"]["rouge_l"] <= hi <= 1
    assert m["_boot_primary"].shape == (200,)


# ---------------------------------------------------------------- data


def test_detect_task_from_columns(tmp_path):
    gen = write_jsonl(tmp_path / "g.jsonl", colour_pairs(3))
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}])
    cls = tmp_path / "t.csv"
    cls.write_text("text,label\ngood,pos\n")
    assert pairs.detect_task(DataConfig(data=gen)) == "generation"
    assert pairs.detect_task(DataConfig(data=chat)) == "generation"
    assert pairs.detect_task(DataConfig(data=cls)) == "classification"
    assert pairs.detect_task(DataConfig(data=cls, task="generation")) == "generation"


def test_chat_messages_last_assistant_is_the_target_and_csv_columns(tmp_path):
    chat = write_jsonl(tmp_path / "c.jsonl", [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                      {"role": "user", "content": "colour of fox"}, {"role": "assistant", "content": "orange"}]},
    ] * 10)
    splits = pairs.load_pairs(DataConfig(train=chat, test=chat), 0)
    p = splits.test[0]
    assert p.completion == "orange" and p.messages[-1] == ("user", "colour of fox") and p.messages[2] == ("assistant", "hello")
    assert len(splits.train) + len(splits.validation) == 10 and splits.test[0].row == 1
    csv_file = tmp_path / "qa.csv"
    csv_file.write_text("question,answer\n" + "".join(f"q{i},a{i}\n" for i in range(20)))
    s = pairs.load_pairs(DataConfig(data=csv_file, task="generation", prompt_column="question", completion_column="answer"), 0)
    assert (len(s.train), len(s.validation), len(s.test)) == (14, 2, 4)
    assert {p.prompt for p in s.train + s.validation + s.test} == {f"q{i}" for i in range(20)}


def test_bad_rows_name_file_line_column_and_fix(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "", "completion": "b"}\nnot json\n{"prompt": "c", "completion": 3}\n'
                   '{"messages": [{"role": "robot", "content": "x"}]}\n')
    with pytest.raises(DataError) as err:
        pairs.load_pairs(DataConfig(data=bad), 0)
    text = str(err.value)
    assert "bad.jsonl line 2, column 'prompt': empty" in text and "--drop-unlabeled" in text
    assert "bad.jsonl line 3: not valid JSON" in text
    assert "bad.jsonl line 5, column 'prompt': empty (got no 'prompt' key)" in text
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"question": "a", "completion": "b"}] * 5)
    with pytest.raises(DataError, match=r"no column 'prompt' \(--prompt-column\).*Pass --prompt-column"):
        pairs.load_pairs(DataConfig(data=wrong, task="generation"), 0)
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}, {"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(DataError) as err:
        pairs.load_pairs(DataConfig(data=chat), 0)
    assert "chat.jsonl line 1, column 'messages': message 1 has role 'robot'" in str(err.value)
    assert "chat.jsonl line 2, column 'messages': no assistant message" in str(err.value)


# ---------------------------------------------------------------- masking, collation, generation


def test_loss_mask_covers_exactly_the_completion_and_its_end_of_turn(tok):
    messages = [{"role": "user", "content": "what colour is the fox"}]
    e = causal_lm.encode(tok, messages, "orange")
    ids = tok.convert_ids_to_tokens(e.input_ids)
    assert ids == ["<|im_start|>", "system", "you", "are", "a", "helpful", "ai", "assistant", "named", "smollm", ",", "trained", "by", "hugging", "face", "<|im_end|>",
                   "<|im_start|>", "user", "what", "colour", "is", "the", "fox", "<|im_end|>", "<|im_start|>", "assistant", "orange", "<|im_end|>"]
    scored = [tok.convert_ids_to_tokens(t) for t in e.labels if t != causal_lm.IGNORE]
    assert scored == ["orange", "<|im_end|>"]
    assert e.labels[: len(ids) - 2] == [causal_lm.IGNORE] * (len(ids) - 2) and not e.truncated
    short = causal_lm.encode(tok, messages, "orange", max_length=20)
    assert short.truncated and len(short.input_ids) == 20 and short.input_ids[-2:] == e.input_ids[-2:] and short.labels[-2:] == e.labels[-2:]


def test_collate_right_and_left_padding(tok):
    a, b = causal_lm.Encoded([5, 6, 7], [-100, 6, 7]), causal_lm.Encoded([8], [8])
    right = causal_lm.collate([a, b], pad_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    left = causal_lm.collate([a, b], pad_id=0, left=True)
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]] and left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_batched_left_padded_generation_equals_one_by_one(tiny_llama, tok):
    model = causal_lm.load_model(tiny_llama)
    convs = [[{"role": "user", "content": "what colour is the fox"}], [{"role": "user", "content": "cat"}], [{"role": "user", "content": "what is the colour of a yak"}]]
    batched = causal_lm.generate(model, tok, convs, max_new_tokens=5, batch_size=3)
    single = [causal_lm.generate(model, tok, [c], max_new_tokens=5, batch_size=1)[0] for c in convs]
    assert batched == single and all(len(s.split()) <= 5 for s in batched)


def _few_shot_prompts(tok, questions: list[str]) -> list[list[int]]:
    shots = []
    for p in colour_pairs(5):
        shots += [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["completion"]}]
    system = [{"role": "system", "content": "you are a helpful ai assistant"}]
    return [causal_lm.prompt_ids(tok, system + shots + [{"role": "user", "content": q}]) for q in questions]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_generation_from_a_shared_prefix_cache_equals_generate_on_whole_prompts(tmp_path, seed):
    """The few-shot path (prefix run once, batches continue from its cache, prompts of different lengths left-padded
    after it) must give the very tokens transformers' generate() gives for the whole prompts, batched or alone."""
    folder = make_tiny_llama(tmp_path / "m", seed=seed)
    model, tok = causal_lm.load_model(folder), causal_lm.load_tokenizer(folder)
    questions = ["what colour is the fox", "cat", "what is the colour of a yak , briefly", "owl", "what colour is the red ram"]
    prompts = _few_shot_prompts(tok, questions)
    shared = min(causal_lm.common_prefix(prompts), min(map(len, prompts)) - 1)
    assert shared >= causal_lm.SHARED_PREFIX_MIN and len(prompts[0]) + 8 <= 128
    stops, pad = causal_lm.stop_token_ids(tok), tok.pad_token_id
    with torch.inference_mode():
        cached = causal_lm.greedy_after_prefix(model, prompts, shared, 8, stops, pad, batch_size=3)
        whole = causal_lm._generate_batches(model, prompts, 8, stops, pad, 3, None)
        alone = [causal_lm._generate_batches(model, [p], 8, stops, pad, 1, None)[0] for p in prompts]
    assert cached == whole == alone
    assert any(len(a) > 0 for a in cached)


def test_generate_takes_the_prefix_path_for_few_shot_prompts_only(tiny_llama, tok, monkeypatch):
    calls = []
    real = causal_lm.greedy_after_prefix
    monkeypatch.setattr(causal_lm, "greedy_after_prefix", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    model = causal_lm.load_model(tiny_llama)
    convs = [[{"role": "user", "content": q}] for q in ("what colour is the fox", "cat")]
    causal_lm.generate(model, tok, convs, max_new_tokens=4)
    assert calls == []  # a zero-shot prompt shares only the template's opening
    shots = []
    for p in colour_pairs(5):
        shots += [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["completion"]}]
    answers = causal_lm.generate(model, tok, [shots + c for c in convs], max_new_tokens=4)
    assert len(calls) == 1 and calls[0] >= causal_lm.SHARED_PREFIX_MIN and len(answers) == 2


def test_token_losses_match_the_models_own_loss(tiny_llama, tok):
    model = causal_lm.load_model(tiny_llama)
    e = causal_lm.encode(tok, [{"role": "user", "content": "what colour is the cat"}], "red")
    batch = causal_lm.collate([e], tok.pad_token_id)
    with torch.no_grad():
        sums, counts = causal_lm.token_losses(model, batch)
        reference = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    assert int(counts[0]) == 2 and float(sums[0] / counts[0]) == pytest.approx(float(reference), rel=1e-5)


# ---------------------------------------------------------------- sequence packing


def test_pack_places_every_example_once_within_capacity():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 40, size=50).tolist()
    rows = causal_lm.pack(lengths, 40)
    assert sorted(i for r in rows for i in r) == list(range(50))
    assert all(sum(lengths[i] for i in r) <= 40 for r in rows)
    assert len(rows) < 50 and causal_lm.pack([50, 3], 40) == [[0], [1]]  # too long for the capacity: a row of its own


def test_packed_rows_restart_positions_and_never_predict_across_examples(tok):
    rows = [causal_lm.encode(tok, [{"role": "user", "content": q}], a) for q, a in (("what colour is the cat", "red"), ("the dog", "blue green"), ("a yak", "gold"))]
    batch = causal_lm.collate_packed(rows, [[1, 2], [0]], tok.pad_token_id)
    n1, n2, n0 = (len(rows[i].input_ids) for i in (1, 2, 0))
    assert batch["input_ids"].shape == (2, max(n1 + n2, n0))
    assert batch["position_ids"][0, : n1 + n2].tolist() == list(range(n1)) + list(range(n2))
    assert batch["example"][0, : n1 + n2].tolist() == [1] * n1 + [2] * n2 and (batch["example"][0, n1 + n2 :] == -1).all()
    assert batch["labels"][0, n1] == causal_lm.IGNORE  # the second example's first token is not predicted from the first's last
    assert batch["labels"][0, :n1].tolist() == [causal_lm.IGNORE] + rows[1].labels[1:]


@pytest.mark.parametrize("routed", [False, True])
def test_packed_losses_equal_unpacked_ones_per_example(tiny_llama, tok, routed):
    """The attention masking done right: each packed example's loss is its loss alone (block-diagonal causal attention,
    positions restarting), through transformers' SDPA and through fmtune's training attention."""
    from fmtune.training import fast_dropout

    model = causal_lm.load_model(tiny_llama)
    if routed:
        fast_dropout.install(model)
    model.train()  # the training attention path; the tiny Llama has no dropout
    pairs = colour_pairs(7)
    rows = [causal_lm.encode(tok, [{"role": "user", "content": p["prompt"]}], p["completion"] + (" red" * (i % 3))) for i, p in enumerate(pairs)]
    groups = causal_lm.pack([len(r.input_ids) for r in rows], 2 * max(len(r.input_ids) for r in rows))
    assert any(len(g) > 1 for g in groups)
    with torch.no_grad():
        packed_sums, packed_counts = causal_lm.token_losses(model, causal_lm.collate_packed(rows, groups, tok.pad_token_id))
        sums, counts = causal_lm.token_losses(model, causal_lm.collate(rows, tok.pad_token_id))
    assert packed_counts.tolist() == counts.tolist()
    torch.testing.assert_close(packed_sums, sums, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft reads the deprecated property
def test_lora_dropout_draws_one_generator_per_decoder_pass(tiny_llama, tok):
    """Causal-LM training calls the decoder, not the whole model: the fast dropout hooks it too, so LoRA's ~7 dropout
    calls per layer share one generator per pass, seeded from torch's RNG (reproducible, one draw from torch's RNG)."""
    from peft import LoraConfig, get_peft_model

    from fmtune.training import fast_dropout

    model = get_peft_model(causal_lm.load_model(tiny_llama), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "v_proj"],
                                                                              init_lora_weights=False))  # B non-zero: the masks show in the loss
    undo, info = fast_dropout.install(model)
    assert info["dropout_modules"] == 4
    model.train()
    rows = [causal_lm.encode(tok, [{"role": "user", "content": p["prompt"]}], p["completion"]) for p in colour_pairs(4)]
    batch = causal_lm.collate(rows, tok.pad_token_id)

    def losses(seed: int):
        torch.manual_seed(seed)
        sums, _ = causal_lm.token_losses(model, batch)
        return sums.detach(), torch.get_rng_state()

    (a, after), (b, again), (c, _) = losses(1), losses(1), losses(2)
    assert torch.equal(a, b) and torch.equal(after, again) and not torch.equal(a, c)
    torch.manual_seed(1)
    torch.randint(0, 2**62, (1,))
    assert torch.equal(after, torch.get_rng_state())  # one seed for the whole decoder pass
    assert fast_dropout._STREAM.generator is None and fast_dropout._STREAM.depth == 0
    undo()


def test_fit_with_packing_records_less_padding(tiny_llama, tok):
    from fmtune.config import TrainConfig

    pairs = colour_pairs(40)
    rows = [causal_lm.encode(tok, [{"role": "user", "content": p["prompt"] + " briefly" * (i % 5)}], p["completion"]) for i, p in enumerate(pairs)]
    results = {}
    for packing in (False, True):
        cfg = TrainConfig(epochs=1, batch_size=8, length_bucketing=False, packing=packing)
        results[packing] = causal.fit(causal_lm.load_model(tiny_llama), rows[:32], rows[32:], cfg, pad_id=tok.pad_token_id, learning_rate=3e-3, seed=0, bf16=False, lora=True)
    assert results[True].levers["packing"] is True and results[False].levers["packing"] is False
    assert results[True].levers["padding_share"] < results[False].levers["padding_share"]
    assert results[True].real_tokens == results[False].real_tokens == sum(len(r.input_ids) for r in rows[:32])
    assert results[True].history[0]["train_loss"] == pytest.approx(results[False].history[0]["train_loss"], rel=0.05)


# ---------------------------------------------------------------- end to end through the CLI


def fmtune(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fmtune.cli", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_llama):
    from fmtune.config import build_config
    from fmtune.runner.pipeline import run as run_generation

    work = tmp_path_factory.mktemp("gen-e2e")
    with pytest.MonkeyPatch.context() as mp:  # module scope: conftest's per-test isolation is not active yet
        mp.setenv("FMTUNE_REGISTRY", str(work / "registry.sqlite"))
        mp.setenv("FMTUNE_CACHE", str(work / "cache"))
        return _run(work, tiny_llama, build_config, run_generation)


def _run(work: Path, tiny_llama: Path, build_config, run_generation):
    data = write_jsonl(work / "colours.jsonl", colour_pairs(60) + [{"prompt": "mail jane.doe@example.com", "completion": "ok"}])
    cfg = build_config(None, {"data": data, "model": str(tiny_llama), "name": "tiny", "out": work / "runs" / "tiny", "epochs": 4, "learning_rate": 3e-3,
                              "lora_learning_rate": 1e-2, "scratch_learning_rate": 3e-3, "bootstrap": 200, "latency_repeats": 3, "batch_size": 8, "few_shot_k": 2,
                              "max_new_tokens": 4, "curve_fractions": [0.25, 0.5]})
    return run_generation(cfg, "test"), tiny_llama


def test_generation_run_folder_and_report_contract(finished_run):
    run, _ = finished_run
    for name in ("config.yaml", "manifest.json", "report.json", "report.html", "model/config.json", "model/model.safetensors", "model/README.md",
                 "adapter/adapter_model.safetensors", "logs/history_fine_tuned.jsonl", "logs/generations.jsonl"):
        assert (run / name).is_file(), name
    report = json.loads((run / "report.json").read_text())
    jsonschema.validate(report, SCHEMA)
    assert report["task"] == {"type": "generation", "primary_metric": "rouge_l", "max_new_tokens": 4, "decoding": "greedy"}
    assert [r["name"] for r in report["ladder"]] == ["zero_shot", "few_shot", "fine_tuned", "from_scratch"]
    for r in report["ladder"]:
        assert set(r["metrics"]) == {"rouge_l", "token_f1", "exact_match", "loss", "perplexity"} and "rouge_l" in r["ci95"]
    assert report["data"]["train"] + report["data"]["validation"] + report["data"]["test"] == 61
    audit = report["data"]["audit"]
    assert audit["pii"]["email"] == 1 and "class_counts" not in audit and audit["duplicates"] == 0 and audit["train_test_overlap"] == 0
    assert report["retention"]["higher_is_better"] is False and report["retention"]["base"] > 1
    assert report["domain_shift"]["score"] > 0 and "ratio" in report["domain_shift"]["interpretation"]
    assert [p["fraction"] for p in report["learning_curve"]["points"]] == [0.25, 0.5, 1.0]
    assert "break_even_requests" in report["cost"] and report["cost"]["break_even_reason"]
    assert report["inference"]["fine_tuned"]["parameters"] == report["inference"]["base"]["parameters"]
    assert report["verdict"]["reasons"]


def test_lora_moved_the_weights_lowered_the_loss_and_reloads_with_plain_transformers(finished_run):
    from transformers import AutoModelForCausalLM

    run, base_dir = finished_run
    base, tuned = load_file(str(base_dir / "model.safetensors")), load_file(str(run / "model" / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base[key], tuned[key])
    report = json.loads((run / "report.json").read_text())
    rungs = {r["name"]: r for r in report["ladder"]}
    assert rungs["fine_tuned"]["metrics"]["loss"] < rungs["zero_shot"]["metrics"]["loss"]
    history = rungs["fine_tuned"]["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    assert model.config.vocab_size == len(json.loads((base_dir / "tokenizer.json").read_text())["model"]["vocab"])


def test_generation_run_through_the_cli(tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "colours.jsonl", colour_pairs(40))
    proc = fmtune("run", "--data", data, "--model", tiny_llama, "--task", "generation", "--out", tmp_path / "runs" / "cli", "--epochs", "1", "--bootstrap", "100",
                  "--latency-repeats", "3", "--max-new-tokens", "3", "--few-shot-k", "1", "--no-curve", "--metric", "exact_match", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "runs" / "cli" / "report.json").read_text())
    jsonschema.validate(report, SCHEMA)
    assert report["task"]["primary_metric"] == "exact_match" and report["learning_curve"]["skipped"]


def test_generation_predictor_from_run(finished_run):
    run, _ = finished_run
    predictor = GenerationPredictor.from_run(run, bf16=False)
    out = predictor.generate(["what colour is the red fox", "what colour is the blue cat"], max_new_tokens=3)
    assert len(out) == 2 and all(isinstance(o, str) and len(o.split()) <= 3 for o in out)
    assert predictor.report["task"]["type"] == "generation" and predictor.run_dir == run


def test_causal_lm_runs_refuse_fsdp_before_any_work(tmp_path, monkeypatch):
    """Causal-LM runs train under torchrun with DDP (tests/test_distributed_generation.py); FSDP, whose root module the
    completion loss bypasses, is refused once, before any folder exists."""
    from fmtune.config import build_config
    from fmtune.errors import FmtuneError
    from fmtune.runner import pipeline

    data = write_jsonl(tmp_path / "qa.jsonl", colour_pairs(20))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    cfg = build_config({}, {"data": str(data), "out": str(tmp_path / "run"), "distributed": "fsdp"})
    with pytest.raises(FmtuneError, match="DDP only"):
        pipeline.run(cfg)
    assert not (tmp_path / "run").exists()


def test_the_decoding_budget_comes_from_the_training_answers(tok):
    from fmtune.tasks.generation import choose_max_new_tokens

    answers = ["orange", "blue", "a dark green colour"]
    longest = max(len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers)
    budget, why = choose_max_new_tokens(tok, answers, None, 512)
    assert budget == max(4, int(np.ceil(1.25 * longest)) + 2) and f"the longest is {longest} tokens" in why
    assert choose_max_new_tokens(tok, answers, 9, 512) == (9, "--max-new-tokens")
    long_answer = " ".join(["colour"] * 400)
    assert choose_max_new_tokens(tok, [long_answer], None, 128)[0] == 64, "at most half the context"
