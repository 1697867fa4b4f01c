"""Classification with a causal LM: prompt rendering, constrained label scoring, and the whole run through the CLI on a
tiny random Llama (the generation tests' model), then predict and serve on that run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from conftest import write_csv
from test_generation import ANIMALS, COLOURS, make_tiny_llama

from fmtune.models import causal_lm, lm_classify

SCHEMA = json.loads((Path(__file__).parents[1] / "src" / "fmtune" / "schema" / "report.schema.json").read_text())


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return causal_lm.load_tokenizer(tiny_llama)


def colour_rows(n: int, colours=("red", "blue"), ratio: int = 1) -> list[tuple[str, str]]:
    """'the red fox' -> red: the label is a word of the text; `ratio` rows of the first colour per row of each other."""
    cycle = [colours[0]] * ratio + list(colours[1:])
    return [(f"the {cycle[i % len(cycle)]} {ANIMALS[i % len(ANIMALS)]}", cycle[i % len(cycle)]) for i in range(n)]


# ---------------------------------------------------------------- prompt and label rendering


def test_the_instruction_names_the_task_and_lists_the_label_words_as_in_the_data():
    p = lm_classify.LabelPrompt(("fresh", "rotten"))
    assert p.instruction() == "Task: classify the text below. Answer with exactly one of these labels and nothing else: fresh, rotten."
    assert p.messages("a delight") == [{"role": "user", "content": p.instruction() + "\n\nText: a delight"}]
    described = lm_classify.LabelPrompt(("fresh", "rotten"), {"fresh": "a positive review"})
    assert described.instruction().endswith("nothing else:\n- fresh: a positive review\n- rotten")
    shots = described.messages("dull", [("a delight", "fresh"), ("a mess", "rotten")])
    assert [m["role"] for m in shots] == ["user", "assistant", "user", "assistant", "user"]
    assert shots[0]["content"].startswith(described.instruction()) and shots[1]["content"] == "fresh"
    assert shots[2]["content"] == "Text: a mess" and shots[3]["content"] == "rotten" and shots[4]["content"] == "Text: dull"
    again = lm_classify.LabelPrompt.from_dict(json.loads(json.dumps(described.to_dict())))
    assert again == described and again.to_dict()["instruction"] == described.instruction()


def test_training_rows_score_the_label_word_and_its_end_of_turn_only(tok):
    p = lm_classify.LabelPrompt(("red", "blue"))
    rows = lm_classify.training_rows(tok, p, ["the red fox", "the blue cat"], ["red", "blue"], [0.5, 2.0])
    scored = [[tok.convert_ids_to_tokens(t) for t in r.labels if t != causal_lm.IGNORE] for r in rows]
    assert scored == [["red", "<|im_end|>"], ["blue", "<|im_end|>"]]
    assert [r.weight for r in rows] == [0.5, 2.0]
    tokens = tok.convert_ids_to_tokens(rows[0].input_ids)
    assert tokens[-6:] == ["fox", "<|im_end|>", "<|im_start|>", "assistant", "red", "<|im_end|>"]
    assert tokens[tokens.index("blue") - 2 : tokens.index("blue") + 1] == ["red", ",", "blue"]  # the label list is in the instruction


def test_cut_keeps_the_start_of_a_long_text(tok):
    assert lm_classify.cut(tok, "the red fox", 8) == ("the red fox", False)
    assert lm_classify.cut(tok, "the red fox is the colour of a cat", 3) == ("the red fox", True)
    assert lm_classify.cut(tok, "anything", None) == ("anything", False)


# ---------------------------------------------------------------- constrained scoring


def test_scoring_sums_label_log_probs_exactly_on_uniform_logits(tiny_llama, tok):
    """With the final norm zeroed every logit is 0: each scored token has log-prob -log V, so a label scores
    -(its tokens + end of turn) * log V, and the shortest label wins."""
    model = causal_lm.load_model(tiny_llama)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    p = lm_classify.LabelPrompt(("red fox", "red", "blue cat dog"))
    scores = lm_classify.label_scores(model, tok, p, ["the blue owl", "what"], batch_size=2)
    log_v = math.log(model.config.vocab_size)
    assert scores == pytest.approx(np.array([[-3, -2, -4], [-3, -2, -4]]) * log_v, abs=1e-4)
    assert scores.argmax(1).tolist() == [1, 1]
    probs = lm_classify.probabilities(scores)
    assert probs.sum(1) == pytest.approx([1.0, 1.0]) and probs[0, 1] == pytest.approx(1 / (1 + 1 / math.exp(log_v) + 1 / math.exp(2 * log_v)))


def reference_scores(model, tok, prompt, texts, shots=()) -> np.ndarray:
    """One plain forward per (text, label), log-softmax of the full logits: the definition the fast path must match."""
    out = []
    with torch.no_grad():
        for t in texts:
            for lab in prompt.labels:
                r = causal_lm.encode(tok, prompt.messages(t, shots), lab)
                logp = model(input_ids=torch.tensor([r.input_ids])).logits[0].log_softmax(-1)
                out.append(sum(float(logp[i - 1, tgt]) for i, tgt in enumerate(r.labels) if tgt != causal_lm.IGNORE))
    return np.array(out).reshape(len(texts), len(prompt.labels))


@pytest.mark.parametrize("few_shot", [False, True])
def test_shared_prefix_scoring_equals_one_forward_per_pair_and_picks_the_argmax(tiny_llama, tok, few_shot):
    model = causal_lm.load_model(tiny_llama)
    p = lm_classify.LabelPrompt(("red", "blue", "red fox"))
    texts = ["the red cat", "a blue dog is what the", "cow", "the gold yak is brown"]
    shots = [("the blue owl", "blue"), ("the red ant", "red")] if few_shot else ()
    fast = lm_classify.label_scores(model, tok, p, texts, shots, batch_size=3)
    ref = reference_scores(model, tok, p, texts, shots)
    assert fast == pytest.approx(ref, abs=1e-4)
    assert fast.argmax(1).tolist() == ref.argmax(1).tolist()
    rows = [causal_lm.encode(tok, p.messages(t, shots), lab) for t in texts for lab in p.labels]
    assert causal_lm.common_prefix([r.input_ids for r in rows]) > 10  # the system turn and instruction (and shots) are shared


def test_training_optimises_what_scoring_measures(tiny_llama, tok):
    """The loss of a training row (prompt, true label) is minus the score of that label for that text: fine-tuning
    lowers exactly the quantity the prediction compares."""
    model = causal_lm.load_model(tiny_llama)
    p = lm_classify.LabelPrompt(("red", "blue"), max_text_tokens=8)
    texts, labels = ["the red cat", "the blue dog"], ["red", "blue"]
    rows = lm_classify.training_rows(tok, p, texts, labels)
    with torch.no_grad():
        sums, _ = causal_lm.token_losses(model, causal_lm.collate(rows, tok.pad_token_id))
    scores = lm_classify.label_scores(model, tok, p, texts)
    assert [-scores[0, 0], -scores[1, 1]] == pytest.approx(sums.tolist(), abs=1e-4)


def test_few_shot_takes_k_per_class_interleaved_and_fewer_when_the_context_is_short(tok):
    p = lm_classify.LabelPrompt(("red", "blue"))
    rows = colour_rows(20)
    texts, y = [t for t, _ in rows], np.array([0 if lab == "red" else 1 for _, lab in rows])
    shots, per_class, why = lm_classify.choose_shots(tok, p, texts, y, ["the red fox"], 3, 10_000, 0)
    assert per_class == 3 and [lab for _, lab in shots] == ["red", "blue"] * 3 and "3 training examples per class" in why
    one = len(causal_lm.encode(tok, p.messages("the red fox", shots[:2]), "blue").input_ids)
    shots, per_class, why = lm_classify.choose_shots(tok, p, texts, y, ["the red fox"], 3, one, 0)
    assert per_class == 1 and len(shots) == 2 and f"fits the model's context of {one} tokens" in why


# ---------------------------------------------------------------- contextual calibration of the no-training rungs


def biased_scores(y: np.ndarray, bias: np.ndarray, signal: float = 2.0) -> np.ndarray:
    """Summed label log-probs with a per-label bias that swamps the text's evidence (`signal` on the true label)."""
    scores = np.full((len(y), len(bias)), -6.0) + bias[None, :]
    scores[np.arange(len(y)), y] += signal
    return scores


def test_calibration_removes_a_constant_per_label_bias():
    y = np.array([0, 1, 2, 1, 2, 0, 2, 2, 1, 0])
    bias = np.array([0.0, -7.0, -9.0])  # label 0's word is the model's favourite
    raw = biased_scores(y, bias)
    assert raw.argmax(1).tolist() == [0] * len(y)
    prior = bias - 5.0  # content-free texts: the same bias, no evidence (any constant shift is harmless)
    assert lm_classify.calibrate(raw, prior).argmax(1).tolist() == y.tolist()
    # the same as dividing each label's probability by its content-free probability and renormalising
    divided = lm_classify.probabilities(raw) / lm_classify.probabilities(prior[None, :])
    assert lm_classify.probabilities(lm_classify.calibrate(raw, prior)) == pytest.approx(divided / divided.sum(1, keepdims=True))
    chosen = lm_classify.choose_calibration(raw, y, prior)
    assert chosen.applied and chosen.validation_calibrated == 1.0 and chosen.validation_raw == pytest.approx(2 / 13)  # all label 0: F1 6/13 for it, 0 for the others
    assert chosen.why == "calibrated: content-free label prior removed (validation macro-F1 1.000 calibrated vs 0.154 raw)"
    assert chosen.apply(raw).argmax(1).tolist() == y.tolist()
    d = chosen.to_dict(["a", "b", "c"])
    assert d["applied"] and d["content_free_texts"] == list(lm_classify.CONTENT_FREE) and d["label_prior"] == {"a": -5.0, "b": -12.0, "c": -14.0}
    assert d["validation_macro_f1"] == {"raw": 0.1538, "calibrated": 1.0}


def test_raw_is_kept_when_calibration_does_not_win_on_validation():
    y = np.array([0, 1, 0, 1, 1, 0])
    unbiased = biased_scores(y, np.zeros(2))
    skewed_prior = np.array([0.0, 4.0])  # a content-free prior that is not the model's bias on real texts
    worse = lm_classify.choose_calibration(unbiased, y, skewed_prior)
    assert not worse.applied and worse.validation_raw == 1.0 and worse.validation_calibrated < 1.0
    assert worse.why.startswith("raw: calibration did not help on validation (validation macro-F1") and "tie" not in worse.why
    assert worse.apply(unbiased) is unbiased
    tie = lm_classify.choose_calibration(unbiased, y, np.array([-3.0, -3.0]))
    assert not tie.applied and tie.validation_raw == tie.validation_calibrated == 1.0 and tie.why.endswith("; a tie keeps raw)")
    empty = lm_classify.choose_calibration(np.zeros((0, 2)), np.zeros(0, dtype=np.int64), np.zeros(2))
    assert not empty.applied and empty.to_dict(["a", "b"])["validation_macro_f1"] == {"raw": None, "calibrated": None}


@pytest.mark.parametrize("few_shot", [False, True])
def test_fit_calibration_scores_content_free_and_validation_texts_in_the_rungs_prompt(tiny_llama, tok, few_shot):
    """The prior is the mean label score after the content-free texts with the rung's own shots; the choice compares
    raw and calibrated macro-F1 of the validation texts."""
    from fmtune.evidence.evaluate import macro_f1

    model = causal_lm.load_model(tiny_llama)
    p = lm_classify.LabelPrompt(("red", "blue"))
    shots = [("the blue owl", "blue"), ("the red ant", "red")] if few_shot else ()
    texts, y = ["the red cat", "the blue dog", "the red cow", "the blue yak"], np.array([0, 1, 0, 1])
    chosen = lm_classify.fit_calibration(model, tok, p, shots, texts, y, batch_size=3)
    prior = lm_classify.label_scores(model, tok, p, list(lm_classify.CONTENT_FREE), shots).mean(0)
    assert chosen.prior == pytest.approx(prior, abs=1e-4)
    val = lm_classify.label_scores(model, tok, p, texts, shots)
    assert chosen.validation_raw == macro_f1(y, val.argmax(1), 2)
    assert chosen.validation_calibrated == macro_f1(y, (val - prior).argmax(1), 2)
    assert chosen.applied == (chosen.validation_calibrated > chosen.validation_raw)


@pytest.mark.parametrize("validation_prefers", ["calibrated", "raw"])
def test_the_pipeline_chooses_calibration_on_validation_never_on_test(tmp_path, tiny_llama, monkeypatch, validation_prefers):
    """Label scores replaced by ones with a bias towards 'blue' that swamps the text's colour: on the test split,
    calibration would recover every label. In the calibration pass (content-free + validation texts) the evidence
    points the right way or, for 'raw', the wrong way, so the zero_shot and few_shot rungs take whatever validation
    prefers and the test split's own answer plays no part. fine_tuned is never calibrated: it stays all 'blue'."""
    from fmtune.config import build_config
    from fmtune.runner.pipeline import run

    def fake_scores(model, tokenizer, prompt, texts, shots=(), batch_size=32, bf16=False, progress=None):
        labels = list(prompt.labels)  # ["blue", "red"]
        in_calibration = lm_classify.CONTENT_FREE[0] in texts
        sign = -1.0 if in_calibration and validation_prefers == "raw" else 1.0
        scores = np.tile(np.array([40.0, 0.0]) - 50.0, (len(texts), 1))
        for i, t in enumerate(texts):
            for j, lab in enumerate(labels):
                if lab in t.split():
                    scores[i, j] += 2.0 * sign
        if progress:
            progress(len(texts))
        return scores

    monkeypatch.setattr(lm_classify, "label_scores", fake_scores)
    data = write_csv(tmp_path / "c.csv", colour_rows(40))
    cfg = build_config(None, {"data": data, "model": str(tiny_llama), "out": tmp_path / "runs" / "cal", "epochs": 1, "bootstrap": 100, "latency_repeats": 3,
                              "few_shot_k": 1, "curve": False, "rungs": ["zero_shot", "few_shot", "fine_tuned"]})
    out = run(cfg, "test")
    report = json.loads((out / "report.json").read_text())
    rungs = {r["name"]: r for r in report["ladder"]}
    choices = {c["setting"]: c for c in report["choices"]}
    for name in ("zero_shot", "few_shot"):
        cal = rungs[name]["calibration"]
        assert cal["applied"] == (validation_prefers == "calibrated") and choices[f"calibration_{name}"]["value"] == validation_prefers
        assert choices[f"calibration_{name}"]["why"] == cal["why"] and cal["label_prior"] == {"blue": -10.0, "red": -50.0}
        if validation_prefers == "calibrated":
            assert cal["validation_macro_f1"]["calibrated"] == 1.0 and rungs[name]["metrics"]["macro_f1"] == 1.0
            assert "contextually calibrated" in rungs[name]["description"]
        else:
            assert cal["validation_macro_f1"]["calibrated"] == 0.0 and rungs[name]["metrics"]["macro_f1"] < 0.5
            assert "contextually calibrated" not in rungs[name]["description"]
    assert "calibration" not in rungs["fine_tuned"] and "calibration_fine_tuned" not in choices
    lines = [json.loads(line) for line in (out / "logs" / "predictions.jsonl").read_text().splitlines()]
    assert {line["fine_tuned"] for line in lines} == {"blue"}
    assert all(line["zero_shot"] == (line["label"] if validation_prefers == "calibrated" else "blue") for line in lines)


# ---------------------------------------------------------------- the whole run through the CLI


def fmtune(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fmtune.cli", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_llama) -> Path:
    """Imbalanced (2:1) red/blue rows: class weights turn on; 4 epochs of LoRA on the tiny Llama, curve included."""
    work = tmp_path_factory.mktemp("lmcls-e2e")
    data = write_csv(work / "colours.csv", colour_rows(90, ratio=2))
    out = work / "runs" / "tiny"
    proc = fmtune("run", "--data", data, "--model", tiny_llama, "--out", out, "--epochs", "4", "--batch-size", "8", "--lora-learning-rate", "1e-2",
                  "--scratch-learning-rate", "3e-3", "--bootstrap", "200", "--latency-repeats", "3", "--few-shot-k", "2", "--curve-fractions", "0.25,0.5",
                  "--label-descriptions", "red=the colour red", cwd=work)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_run_folder_and_report_contract(finished_run):
    run = finished_run
    for name in ("config.yaml", "manifest.json", "report.json", "report.html", "model/config.json", "model/model.safetensors", "model/README.md",
                 f"model/{lm_classify.PROMPT_FILE}", "adapter/adapter_model.safetensors", "logs/history_fine_tuned.jsonl", "logs/predictions.jsonl"):
        assert (run / name).is_file(), name
    report = json.loads((run / "report.json").read_text())
    jsonschema.validate(report, SCHEMA)
    task = report["task"]
    assert task["type"] == "classification" and task["primary_metric"] == "macro_f1" and task["labels"] == ["blue", "red"] and task["model_kind"] == "causal_lm"
    assert "- red: the colour red" in task["prompt"]["instruction"]
    assert [r["name"] for r in report["ladder"]] == ["zero_shot", "few_shot", "fine_tuned", "from_scratch"]
    assert "head_only" in report["skipped_rungs"]
    for r in report["ladder"]:
        assert set(r["metrics"]) == {"macro_f1", "accuracy"} and set(r["per_class_f1"]) == {"blue", "red"}
        assert np.array(r["confusion_matrix"]).sum() == report["data"]["test"]
        lo, hi = r["ci95"]["macro_f1"]
        assert lo <= r["metrics"]["macro_f1"] <= hi
    rungs = {r["name"]: r for r in report["ladder"]}
    assert rungs["few_shot"]["train_examples"] == 4 and rungs["few_shot"]["shots_per_class"] == 2
    assert rungs["fine_tuned"]["method"] == "lora" and rungs["fine_tuned"]["history"][-1]["train_loss"] < rungs["fine_tuned"]["history"][0]["train_loss"]
    choices = {c["setting"]: c for c in report["choices"]}
    assert choices["class_weights"]["value"] is not None and report["levers"]["example_weights"] is True
    assert choices["scoring"]["value"] == "constrained" and choices["few_shot_k"]["value"] == 2
    for name in ("zero_shot", "few_shot"):  # raw or calibrated, chosen on validation, with both numbers
        cal, choice = rungs[name]["calibration"], choices[f"calibration_{name}"]
        f1 = cal["validation_macro_f1"]
        assert choice["value"] == ("calibrated" if cal["applied"] else "raw") and cal["applied"] == (f1["calibrated"] > f1["raw"])
        assert choice["why"] == cal["why"] and f"validation macro-F1 {f1['calibrated']:.3f} calibrated vs {f1['raw']:.3f} raw" in cal["why"]
        assert set(cal["label_prior"]) == {"blue", "red"} and cal["content_free_texts"] == list(lm_classify.CONTENT_FREE)
    assert "calibration" not in rungs["fine_tuned"] and "calibration" not in rungs["from_scratch"]
    assert report["data"]["audit"]["class_counts"]["train"]["red"] > report["data"]["audit"]["class_counts"]["train"]["blue"]
    assert report["retention"]["higher_is_better"] is False and report["domain_shift"]["score"] > 0
    assert [p["fraction"] for p in report["learning_curve"]["points"]] == [0.25, 0.5, 1.0]
    assert report["cost"]["break_even_reason"] and "per_request" in report["inference"]
    assert report["verdict"]["reasons"] and report["verdict"]["baseline"] in ("zero_shot", "few_shot")
    html = (run / "report.html").read_text()
    assert "fine_tuned" in html and "blue" in html


def test_lora_moved_the_weights_lowered_the_loss_and_logged_predictions(finished_run, tiny_llama):
    from safetensors.torch import load_file

    base, tuned = load_file(str(tiny_llama / "model.safetensors")), load_file(str(finished_run / "model" / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base[key], tuned[key])
    report = json.loads((finished_run / "report.json").read_text())
    history = {r["name"]: r for r in report["ladder"]}["fine_tuned"]["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"] and history[-1]["val_loss"] < history[0]["val_loss"]
    lines = [json.loads(line) for line in (finished_run / "logs" / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == report["data"]["test"] and {"row", "text", "label", "zero_shot", "few_shot", "fine_tuned", "from_scratch"} <= set(lines[0])
    assert all(line[r] in ("blue", "red") for line in lines for r in ("zero_shot", "fine_tuned"))


def test_predict_cli_and_predictor_return_a_label_with_probabilities(finished_run):
    from fmtune.serving.predict import Predictor

    proc = fmtune("predict", finished_run, "--text", "the red owl", "--text", "the blue cow", "--json", cwd=finished_run.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [o["text"] for o in out] == ["the red owl", "the blue cow"]
    for o in out:
        assert o["label"] in ("blue", "red") and sum(o["probabilities"].values()) == pytest.approx(1.0)
        assert max(o["log_probs"], key=o["log_probs"].get) == o["label"] and all(v < 0 for v in o["log_probs"].values())
    predictor = Predictor.from_run(finished_run, bf16=False)
    assert predictor.labels == ["blue", "red"] and predictor.label_prompt is not None
    probs = predictor.predict_proba(["the red owl", "the blue cow", "the red owl"], batch_size=2)
    assert probs.shape == (3, 2) and probs[0] == pytest.approx(probs[2], abs=1e-5)
    # the CLI may run in bf16 (where the CPU supports it): same probabilities up to bf16 rounding
    assert [o["probabilities"]["red"] for o in out] == pytest.approx(probs[:2, 1].tolist(), abs=2e-2)


def test_serve_predicts_with_the_same_predictor(finished_run):
    from fastapi.testclient import TestClient

    from fmtune.serving.predict import Predictor
    from fmtune.serving.serve import ServeConfig, create_app

    app = create_app(Predictor.from_run(finished_run, bf16=False), ServeConfig(no_auth=True))
    with TestClient(app) as client:
        r = client.post("/v1/predict", json={"texts": ["the red owl", "the blue cow"]})
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]
        assert len(preds) == 2 and all(p["label"] in ("blue", "red") for p in preds)
        info = client.get("/v1/model").json()
        assert info["task"] == "classification" and info["labels"] == ["blue", "red"]


def test_full_fine_tuning_through_the_dispatch(tmp_path, tiny_llama):
    """--method full on a balanced three-label set (no class weights), no curve, no from_scratch rung."""
    from fmtune.config import build_config
    from fmtune.runner.pipeline import run

    data = write_csv(tmp_path / "c.csv", colour_rows(45, colours=tuple(COLOURS[:3])))
    cfg = build_config(None, {"data": data, "model": str(tiny_llama), "out": tmp_path / "runs" / "full", "method": "full", "epochs": 1, "bootstrap": 100,
                              "latency_repeats": 3, "few_shot_k": 1, "curve": False, "rungs": ["zero_shot", "few_shot", "fine_tuned"], "learning_rate": 1e-3})
    out = run(cfg, "test")
    report = json.loads((out / "report.json").read_text())
    rungs = {r["name"]: r for r in report["ladder"]}
    assert rungs["fine_tuned"]["method"] == "full" and "from_scratch" not in rungs and report["learning_curve"]["skipped"]
    assert report["task"]["labels"] == ["blue", "green", "red"] and dict(report["levers"])["example_weights"] is False


# ---------------------------------------------------------------- the real packaged SmolLM2


@pytest.mark.integration
def test_smollm2_classifies_rotten_tomatoes_snippets(tmp_path, monkeypatch):
    """--model smollm2 on text/label data: a tiny real run (56 training snippets, 1 epoch of LoRA) through the dispatch;
    the tuned model puts more probability on the true labels of the test snippets than the base model does."""
    from fmtune.config import build_config
    from fmtune.data.quickstart import QUICKSTART_DESCRIPTIONS, rotten_tomatoes_csv
    from fmtune.runner.pipeline import run
    from fmtune.serving.predict import Predictor

    monkeypatch.setenv("FMTUNE_CACHE", str(tmp_path / "cache"))
    causal_lm.smollm2_folder()  # the one-time GGUF conversion (about 20 s) is not part of the run
    cfg = build_config(None, {"data": rotten_tomatoes_csv(80, 0), "model": "smollm2", "out": tmp_path / "runs" / "smol", "epochs": 1, "batch_size": 16,
                              "lora_learning_rate": 1e-3, "few_shot_k": 2, "curve": False, "bootstrap": 200, "latency_repeats": 3, "threads": 2,
                              "label_descriptions": QUICKSTART_DESCRIPTIONS})
    out = run(cfg, "test")
    report = json.loads((out / "report.json").read_text())
    jsonschema.validate(report, SCHEMA)
    assert report["task"]["model_kind"] == "causal_lm" and report["task"]["labels"] == ["fresh", "rotten"]
    assert report["base_model"]["architecture"] == "LlamaForCausalLM" and report["data"]["train"] == 56
    assert [r["name"] for r in report["ladder"]] == ["zero_shot", "few_shot", "fine_tuned", "from_scratch"]
    # no wall-time bound here: timing belongs in benchmarks/ (a shared 2-core host ran this in 336 s while a benchmark ran beside it)
    test = [json.loads(line) for line in (out / "logs" / "predictions.jsonl").read_text().splitlines()]
    texts, truth = [t["text"] for t in test], np.array([report["task"]["labels"].index(t["label"]) for t in test])
    tuned = Predictor.from_run(out, bf16=False)
    base = causal_lm.load_model(Path(report["base_model"]["path"]))
    before = lm_classify.label_scores(base, tuned.tokenizer, tuned.label_prompt, texts)
    after = tuned.label_scores(texts)
    picked = lambda s: float(np.log(lm_classify.probabilities(s))[np.arange(len(truth)), truth].mean())  # noqa: E731
    assert picked(after) > picked(before)
