"""Causal-LM runs. Generation: prompt/completion (or chat) data -> audit -> ladder (zero_shot, few_shot, fine_tuned,
from_scratch) -> learning curve, retention and domain shift as perplexity, cost with break-even, size/latency -> verdict
-> run folder. Classification with a causal LM (run_lm_classification): text/label data, the label word as the answer,
constrained scoring over the label set (fmtune.lm_classify), the same evidence.

The same run folder and report.json contract as classification (fmtune.pipeline); its helpers are reused, not copied,
and the stages both causal-LM runs share are the functions below run_generation.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fmtune.version import __version__
from fmtune.config import RunConfig, to_yaml
from fmtune.errors import ConfigError
from fmtune.retention import gate as retention_gate
from fmtune.models import model_token_limit
from fmtune.runner.console import console, print_summary, progress_bar, raise_if_gate_failed, stage
from fmtune.runner.folder import disk_io, mark_interrupted, open_run_dir, record, run_name
from fmtune.runner.ladder import choose_max_length
from fmtune.runner.report import finish

DEFAULT_METRIC = "rouge_l"
RETENTION_CHUNKS, RETENTION_CHUNK_TOKENS = 32, 128  # 4k tokens per model: base and tuned are scored on the same tokens
LATENCY_REQUESTS = 8  # requests timed per model for the per-request cost (batch 1)
LATENCY_BATCH = 4  # batched forward-pass latency: small batches, a causal LM forward on CPU is costly


def primary_metric(cfg: RunConfig) -> str:
    from fmtune.gen_metrics import TEXT_METRICS

    metric = cfg.eval.metric or DEFAULT_METRIC
    if metric not in TEXT_METRICS:
        raise ConfigError(f"--metric {metric}: not a generation metric; choose one of {', '.join(TEXT_METRICS)} (default {DEFAULT_METRIC}).")
    return metric


def few_shot_conversation(shots: list, messages: list[dict]) -> list[dict]:
    """k training pairs as previous chat turns, then the conversation to answer."""
    turns: list[dict] = []
    for p in shots:
        turns += [m for m in p.chat() if m["role"] != "system"] + [{"role": "assistant", "content": p.completion}]
    system = [m for m in messages if m["role"] == "system"]
    return system + turns + [m for m in messages if m["role"] != "system"]


def choose_shots(tokenizer, train: list, test: list, k: int, budget: int, seed: int) -> tuple[list, str]:
    """k seeded random training pairs, fewer when the longest test prompt with them would not fit `budget` tokens."""
    from fmtune import causal_lm

    rng = np.random.default_rng(seed + 2)
    shots = [train[i] for i in rng.permutation(len(train))[: min(k, len(train))]]
    longest = max(test, key=lambda p: len(p.prompt))
    while shots and len(causal_lm.prompt_ids(tokenizer, few_shot_conversation(shots, longest.chat()))) > budget:
        shots.pop()
    why = f"{len(shots)} random training pairs as previous chat turns (--few-shot-k {k})"
    if len(shots) < min(k, len(train)):
        why += f", fewer so that the longest test prompt fits {budget} tokens (the context minus max_new_tokens)"
    return shots, why


def run_generation(cfg: RunConfig, command: str = "fmtune run", show_summary: bool = True) -> Path:
    """Run the whole evidence pipeline for a generation task; returns the finished run folder."""
    from transformers.utils import logging as hf_logging

    from fmtune import audit as audit_mod
    from fmtune import causal_lm, gen_data, models, verdict
    from fmtune.evaluate import bootstrap_indices
    from fmtune.gen_metrics import generation_metrics

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    primary = primary_metric(cfg)
    started, wall_start, io_start = datetime.now(timezone.utc), time.perf_counter(), disk_io()
    name, out, tmp = start_run(cfg)
    log: list[str] = []
    device = models.default_device()
    seed = cfg.seed
    try:
        # ---- data, base model, audit
        with stage("load and split data", log):
            splits = gen_data.load_pairs(cfg.data, seed)
            redacted: dict[str, int] = {}
            if cfg.data.redact_pii:
                splits, redacted = gen_data.redact(splits)
        with stage("load the base model", log):
            model_path, model_name, tokenizer, template_why, base = load_base(cfg, device)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        bf16 = {"on": True, "off": False}.get(cfg.train.bf16, models.bf16_supported(device))
        pairs = {s: getattr(splits, s) for s in ("train", "validation", "test")}
        with stage("audit data", log):
            full = {s: [causal_lm.encode(tokenizer, p.chat(), p.completion) for p in ps] for s, ps in pairs.items()}
            lengths = {s: [len(e.input_ids) for e in enc] for s, enc in full.items()}
            limit = model_token_limit(base.config, tokenizer)
            max_length, max_length_why = choose_max_length(lengths["train"], limit, cfg.model.max_length)
            audit = audit_mod.audit(splits.for_audit(), token_lengths=lengths, max_length=max_length, redacted=redacted, model_limit=limit, classes=False)
            audit = _generation_audit(audit, splits, gen_data.prompt_overlap(splits))
        enc = {s: [causal_lm.encode(tokenizer, p.chat(), p.completion, max_length) for p in ps] for s, ps in pairs.items()}
        truncated = {s: sum(e.truncated for e in rows) for s, rows in enc.items()}
        choices = [
            {"setting": "max_length", "value": max_length, "why": f"{max_length_why} (prompt + completion in the chat template; over it the prompt loses its start, the completion keeps at least half)"},
            {"setting": "chat_template", "value": True, "why": template_why},
            {"setting": "loss", "value": "completion tokens only", "why": "prompt and template tokens are masked (labels -100): the model learns the answers, not the questions"},
            {"setting": "bf16", "value": bf16, "why": f"--bf16 {cfg.train.bf16}" + (" (hardware supports bf16)" if bf16 and cfg.train.bf16 == "auto" else " (no bf16 speed-up detected)" if cfg.train.bf16 == "auto" else "")},
            {"setting": "primary_metric", "value": primary, "why": "--metric" if cfg.eval.metric else f"default for generation ({DEFAULT_METRIC}: longest-common-subsequence F1 on normalised words)"},
        ]
        references = [p.completion for p in pairs["test"]]
        boot = bootstrap_indices(len(references), cfg.eval.bootstrap, seed)
        ladder: list[dict] = []
        boots: dict[str, np.ndarray] = {}
        generations: dict[str, list[str]] = {}
        new_tokens, bs = cfg.eval.max_new_tokens, cfg.eval.eval_batch_size

        def rung(rung_name: str, description: str, model, conversations: list[list[dict]], scored: list, train_examples: int, train_seconds: float, **extra) -> dict:
            with progress_bar() as prog:
                task = prog.add_task(f"{rung_name}: generating", total=len(conversations), info="")
                t0 = time.perf_counter()
                preds = causal_lm.generate(model, tokenizer, conversations, new_tokens, bs, bf16, limit - new_tokens, lambda n: prog.advance(task, n))
                gen_s = time.perf_counter() - t0
            nll = causal_lm.completion_nll(model, scored, pad_id, bs, bf16)
            m = generation_metrics(preds, references, nll, boot, primary)
            boots[rung_name] = m.pop("_boot_primary")
            generations[rung_name] = preds
            row = {"name": rung_name, "description": description, **m, "train_examples": int(train_examples), "train_seconds": round(float(train_seconds), 3), "eval_seconds": round(gen_s, 3), **extra}
            ladder.append(row)
            return row

        # ---- no-training rungs
        test_chats = [p.chat() for p in pairs["test"]]
        if "zero_shot" in cfg.eval.rungs:
            with stage("rung zero_shot", log):
                rung("zero_shot", "the base model answers the prompt alone (chat template, greedy decoding)", base, test_chats, enc["test"], 0, 0.0)
        shots, shots_why = choose_shots(tokenizer, pairs["train"], pairs["test"], cfg.eval.few_shot_k, limit - new_tokens, seed)
        shot_chats = [few_shot_conversation(shots, c) for c in test_chats]  # also the break-even's prompt
        if "few_shot" in cfg.eval.rungs:
            with stage("rung few_shot", log):
                shot_scored = [causal_lm.encode(tokenizer, c, p.completion) for c, p in zip(shot_chats, pairs["test"])]
                rung("few_shot", f"the base model with {len(shots)} training pairs as previous chat turns in every prompt", base, shot_chats, shot_scored, len(shots), 0.0)
            choices.append({"setting": "few_shot_k", "value": len(shots), "why": shots_why})

        # ---- trained rungs
        lora = cfg.train.method in ("auto", "lora")  # auto = LoRA for causal LMs
        method = "lora" if lora else "full"
        ft_lr = (cfg.train.lora_learning_rate or cfg.train.learning_rate * 10) if lora else cfg.train.learning_rate

        def train_rung(label: str, subset: np.ndarray | None, from_scratch: bool, lr: float, use_lora: bool):
            idx = np.arange(len(enc["train"])) if subset is None else subset
            return fit_rung(cfg, model_path, device, label, [enc["train"][i] for i in idx], enc["validation"], lr=lr, lora=use_lora,
                            from_scratch=from_scratch, pad_id=pad_id, bf16=bf16), len(idx)

        with stage(f"rung fine_tuned ({method})", log):
            ft, n = train_rung("fine-tuning", None, False, ft_lr, lora)
            desc = f"{'LoRA (r=' + str(cfg.train.lora_r) + ', merged)' if lora else 'full'} fine-tuning of the base model on all training pairs, loss on the completions, best validation-loss epoch ({ft.best_epoch} of {ft.epochs_run})"
            ft_row = rung("fine_tuned", desc, ft.model, test_chats, enc["test"], n, ft.train_seconds, history=ft.history, best_epoch=ft.best_epoch, stopped=ft.stopped, learning_rate=ft_lr, method=method)
            (tmp / "logs" / "history_fine_tuned.jsonl").write_text("".join(json.dumps(h) + "\n" for h in ft.history))
        choices.append({"setting": "epochs", "value": ft.best_epoch, "why": f"{ft.stopped}; best validation loss at epoch {ft.best_epoch} (max {cfg.train.epochs}, patience {cfg.train.patience})"})
        choices.append({"setting": "learning_rate", "value": ft_lr, "why": "LoRA default: 10x --learning-rate" if lora and not cfg.train.lora_learning_rate else "--lora-learning-rate" if lora else "--learning-rate"})
        if "from_scratch" in cfg.eval.rungs:
            with stage("rung from_scratch", log):
                sc, n = train_rung("from scratch", None, True, cfg.train.scratch_learning_rate, False)
                desc = f"same architecture, random init, same data and budget (max {cfg.train.epochs} epochs, early stopping), lr {cfg.train.scratch_learning_rate:g}"
                rung("from_scratch", desc, sc.model, test_chats, enc["test"], n, sc.train_seconds, history=sc.history, best_epoch=sc.best_epoch, stopped=sc.stopped, learning_rate=cfg.train.scratch_learning_rate)
                del sc

        # ---- learning curve (one group: nested random subsets)
        curve, curve_seconds = learning_curve_evidence(
            cfg, log, np.zeros(len(enc["train"]), dtype=np.int64), lambda label, subset: train_rung(label, subset, False, ft_lr, lora),
            lambda model: generation_metrics(causal_lm.generate(model, tokenizer, test_chats, new_tokens, bs, bf16, limit - new_tokens), references, None, boot, primary),
            ft_row, ft.epochs_run, boots["fine_tuned"], primary)

        # ---- retention and domain shift, as perplexity
        tuned = ft.model
        with stage("retention and domain shift", log):
            retention_, shift = perplexity_evidence(cfg, base, tuned, tokenizer, [f"{p.prompt}\n{p.completion}" for p in pairs["train"]], bf16)

        # ---- the model folder
        with stage("save model", log):
            model_dir = save_model(tmp, tuned, tokenizer, ft.adapter)
            (tmp / "logs" / "generations.jsonl").write_text("".join(
                json.dumps({"row": p.row, "prompt": p.prompt, "reference": p.completion, **{r: generations[r][i] for r in generations}}, ensure_ascii=False) + "\n"
                for i, p in enumerate(pairs["test"])
            ))

        # ---- size, speed and cost per request
        with stage("measure size, latency and cost per request", log):
            inf = size_and_latency(cfg, base, tuned, tokenizer, model_path, model_dir, test_chats, max_length, bf16, lora)
            k = max(1, min(LATENCY_REQUESTS, cfg.evidence.latency_repeats, len(test_chats)))
            per_request = {
                "few_shot": causal_lm.request_seconds(base, tokenizer, shot_chats[:k], new_tokens, bf16),
                "fine_tuned": causal_lm.request_seconds(tuned, tokenizer, test_chats[:k], new_tokens, bf16),
            }
            inf["per_request"] = per_request

        hardware = models.hardware_description()
        cost_ = verdict.cost(ladder, hardware, os.cpu_count() or 1, cfg.evidence.price_per_hour, curve_seconds, "generation")
        cost_.update(break_even(cost_, per_request))
        verdict_ = verdict.verdict(ladder, boots, primary, retention_, audit, curve, cost_)
        verdict_["gates"] = retention_gate(retention_, cfg.evidence.max_forgetting)
        report = {
            "fmtune_version": __version__,
            "run": {"name": name, "status": "complete", "started_at": started.isoformat(timespec="seconds"), "finished_at": None,
                    "wall_seconds": None, "seed": seed, "command": command, "stages": log},
            "task": {"type": "generation", "primary_metric": primary, "max_new_tokens": new_tokens, "decoding": "greedy"},
            "data": {"train": len(pairs["train"]), "validation": len(pairs["validation"]), "test": len(pairs["test"]), "sha256": splits.sha256,
                     "files": splits.files, "dropped": splits.dropped, "truncated": truncated, "audit": audit},
            "base_model": {"name": model_name, "path": str(model_path), "parameters": models.count_parameters(base),
                           "sha256": models.weights_hash(model_path), "architecture": type(base).__name__, "max_length": max_length},
            "choices": choices,
            "levers": dict(ft.levers),
            "ladder": ladder,
            "retention": retention_,
            "domain_shift": shift,
            "learning_curve": curve,
            "cost": cost_,
            "inference": inf,
            "verdict": verdict_,
        }
        finish(report, cfg, tmp, out, wall_start, model_path, io_start)
    except BaseException as exc:
        mark_interrupted(tmp, out, resumable=False)
        record(out, name, "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed", work_dir=tmp)
        raise
    return summarise(report, out, show_summary)


def run_lm_classification(cfg: RunConfig, command: str = "fmtune run", show_summary: bool = True) -> Path:
    """Classification with a causal LM: text/label data, each text a chat whose answer is its label word (LoRA by default),
    constrained scoring over the label set (fmtune.lm_classify). The classification metrics, CIs and verdict of
    fmtune.pipeline; retention, domain shift, cost per request and latency as in run_generation."""
    from transformers.utils import logging as hf_logging

    from fmtune import audit as audit_mod
    from fmtune import causal_lm, data, lm_classify, models, train, verdict
    from fmtune.evaluate import bootstrap_indices, classification_metrics
    from fmtune.runner.ladder import classification_primary, classification_rung

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    primary = classification_primary(cfg)
    started, wall_start, io_start = datetime.now(timezone.utc), time.perf_counter(), disk_io()
    log: list[str] = []
    seed = cfg.seed
    # input problems stop the run before any folder is created
    with stage("load and split data", log):
        splits = data.load_splits(cfg.data, seed)
        redacted: dict[str, int] = {}
        if cfg.data.redact_pii:
            splits, redacted = audit_mod.redact_splits(splits)
        labels = splits.labels
        unknown = sorted(set(cfg.data.label_descriptions) - set(labels))
        if unknown:
            raise ConfigError(f"--label-descriptions names label(s) {unknown} that the data does not have; labels are {labels}.")
    name, out, tmp = start_run(cfg)
    device = models.default_device()
    try:
        with stage("load the base model", log):
            model_path, model_name, tokenizer, template_why, base = load_base(cfg, device)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        bf16 = {"on": True, "off": False}.get(cfg.train.bf16, models.bf16_supported(device))
        bs = cfg.eval.eval_batch_size
        texts = {s: [e.text for e in getattr(splits, s)] for s in ("train", "validation", "test")}
        label_index = {lab: i for i, lab in enumerate(labels)}
        y = {s: np.array([label_index[e.label] for e in getattr(splits, s)], dtype=np.int64) for s in texts}
        with stage("audit data", log):
            lengths = {s: [len(ids) for ids in tokenizer(t, add_special_tokens=False)["input_ids"]] if t else [] for s, t in texts.items()}
            limit = model_token_limit(base.config, tokenizer)
            bare = lm_classify.LabelPrompt(tuple(labels), dict(cfg.data.label_descriptions))
            overhead = max(len(causal_lm.encode(tokenizer, bare.messages(""), lab).input_ids) for lab in labels)
            if limit - overhead < 8:
                raise ConfigError(f"the instruction, the {len(labels)} labels and the chat template take {overhead} of the model's {limit} tokens, leaving no room "
                                  "for the text. Fix: shorter --label-descriptions, or a model with a longer context.")
            max_length, max_length_why = choose_max_length(lengths["train"], limit - overhead, cfg.model.max_length)
            audit = audit_mod.audit(splits, token_lengths=lengths, max_length=max_length, redacted=redacted, model_limit=limit - overhead)
        prompt = lm_classify.LabelPrompt(tuple(labels), dict(cfg.data.label_descriptions), max_length)
        cut = {s: [lm_classify.cut(tokenizer, t, max_length) for t in ts] for s, ts in texts.items()}
        truncated = {s: sum(c for _, c in rows) for s, rows in cut.items()}
        texts = {s: [t for t, _ in rows] for s, rows in cut.items()}
        class_weight, cw_why = train.class_weight_vector(y["train"], len(labels), cfg.train.class_weights)
        choices = [
            {"setting": "max_length", "value": max_length, "why": f"{max_length_why} (tokens of the text alone; the instruction, label list and chat template add up to {overhead}; a longer text keeps its start)"},
            {"setting": "formulation", "value": "label word as the chat answer", "why": f"a causal LM classifies by answering: the user turn names the task and lists the labels as they appear in the data ({prompt.instruction()!r}), then the text; the answer is the label word"},
            {"setting": "scoring", "value": "constrained", "why": f"{lm_classify.SCORING}; no free generation, so every prediction is one of the labels"},
            {"setting": "chat_template", "value": True, "why": template_why},
            {"setting": "loss", "value": "label tokens only", "why": "prompt and template tokens are masked (labels -100): the model learns to answer with the label"},
            {"setting": "class_weights", "value": None if class_weight is None else [round(float(w), 4) for w in class_weight],
             "why": cw_why + ("; each training example's loss is weighted by its class's weight" if class_weight is not None else "")},
            {"setting": "bf16", "value": bf16, "why": f"--bf16 {cfg.train.bf16}" + (" (hardware supports bf16)" if bf16 and cfg.train.bf16 == "auto" else " (no bf16 speed-up detected)" if cfg.train.bf16 == "auto" else "")},
        ]
        boot = bootstrap_indices(len(y["test"]), cfg.eval.bootstrap, seed)
        ladder: list[dict] = []
        boots: dict[str, np.ndarray] = {}
        predictions: dict[str, np.ndarray] = {}

        def rung(rung_name: str, description: str, model, shots: list, train_examples: int, train_seconds: float, calibrated: bool = False, **extra) -> dict:
            """Scores the test split; with `calibrated` (the no-training rungs) the content-free texts and the validation split
            first, to choose raw or calibrated scores on validation (lm_classify.fit_calibration)."""
            calibration = None
            with progress_bar() as prog:
                if calibrated:
                    n_cal = len(lm_classify.CONTENT_FREE) + len(texts["validation"])
                    task = prog.add_task(f"{rung_name}: content-free and validation texts (calibration)", total=n_cal, info="")
                    t0 = time.perf_counter()
                    calibration = lm_classify.fit_calibration(model, tokenizer, prompt, shots, texts["validation"], y["validation"], bs, bf16, lambda n: prog.advance(task, n))
                    extra["calibration"] = {**calibration.to_dict(labels), "seconds": round(time.perf_counter() - t0, 3)}
                    choices.append({"setting": f"calibration_{rung_name}", "value": "calibrated" if calibration.applied else "raw", "why": calibration.why})
                    if calibration.applied:
                        description += "; contextually calibrated (each label's log-probability minus its mean after content-free texts, chosen on validation)"
                task = prog.add_task(f"{rung_name}: scoring the labels", total=len(texts["test"]), info="")
                t0 = time.perf_counter()
                scores = lm_classify.label_scores(model, tokenizer, prompt, texts["test"], shots, bs, bf16, lambda n: prog.advance(task, n))
                eval_s = time.perf_counter() - t0
            if calibration is not None:
                scores = calibration.apply(scores)
            predictions[rung_name] = scores.argmax(1)
            row, boots[rung_name] = classification_rung(rung_name, description, y["test"], predictions[rung_name], labels, boot, train_examples, train_seconds, primary, eval_seconds=round(eval_s, 3), **extra)
            ladder.append(row)
            return row

        # ---- no-training rungs: prompting the base model
        if "zero_shot" in cfg.eval.rungs:
            with stage("rung zero_shot", log):
                rung("zero_shot", "the base model, no labeled examples: the instruction and the label list, constrained scoring of the labels", base, [], 0, 0.0, calibrated=True)
        shots, per_class, shots_why = lm_classify.choose_shots(tokenizer, prompt, texts["train"], y["train"], texts["test"] + texts["validation"], cfg.eval.few_shot_k, limit, seed)
        if "few_shot" in cfg.eval.rungs:
            with stage("rung few_shot", log):
                rung("few_shot", f"the base model with {per_class} labeled examples per class ({len(shots)} in all) as previous chat turns in every prompt, constrained scoring",
                     base, shots, len(shots), 0.0, calibrated=True, shots_per_class=per_class)
            choices.append({"setting": "few_shot_k", "value": per_class, "why": shots_why})
        skipped = {}
        if "head_only" in cfg.eval.rungs:
            skipped["head_only"] = ("not run for a causal LM: head_only is a linear head on a frozen encoder's embeddings; here the no-training rungs are the "
                                    "same model prompted (zero_shot, few_shot), and the report contract makes head_only optional")

        # ---- trained rungs: the label word as the answer, loss on its tokens
        lora = cfg.train.method in ("auto", "lora")  # auto = LoRA for causal LMs
        method = "lora" if lora else "full"
        ft_lr = (cfg.train.lora_learning_rate or cfg.train.learning_rate * 10) if lora else cfg.train.learning_rate
        weights = None if class_weight is None else class_weight[y["train"]]
        rows = {"train": lm_classify.training_rows(tokenizer, prompt, texts["train"], [labels[i] for i in y["train"]], weights),
                "validation": lm_classify.training_rows(tokenizer, prompt, texts["validation"], [labels[i] for i in y["validation"]])}

        def train_rung(label: str, subset: np.ndarray | None, from_scratch: bool, lr: float, use_lora: bool):
            idx = np.arange(len(rows["train"])) if subset is None else subset
            return fit_rung(cfg, model_path, device, label, [rows["train"][i] for i in idx], rows["validation"], lr=lr, lora=use_lora,
                            from_scratch=from_scratch, pad_id=pad_id, bf16=bf16), len(idx)

        with stage(f"rung fine_tuned ({method})", log):
            ft, n = train_rung("fine-tuning", None, False, ft_lr, lora)
            desc = f"{'LoRA (r=' + str(cfg.train.lora_r) + ', merged)' if lora else 'full'} fine-tuning of the base model to answer with the label word, loss on the label tokens, best validation-loss epoch ({ft.best_epoch} of {ft.epochs_run}); zero-shot prompt, constrained scoring"
            ft_row = rung("fine_tuned", desc, ft.model, [], n, ft.train_seconds, history=ft.history, best_epoch=ft.best_epoch, stopped=ft.stopped, learning_rate=ft_lr, method=method)
            (tmp / "logs" / "history_fine_tuned.jsonl").write_text("".join(json.dumps(h) + "\n" for h in ft.history))
        choices.append({"setting": "epochs", "value": ft.best_epoch, "why": f"{ft.stopped}; best validation loss (label tokens) at epoch {ft.best_epoch} (max {cfg.train.epochs}, patience {cfg.train.patience})"})
        choices.append({"setting": "learning_rate", "value": ft_lr, "why": "LoRA default: 10x --learning-rate" if lora and not cfg.train.lora_learning_rate else "--lora-learning-rate" if lora else "--learning-rate"})
        if "from_scratch" in cfg.eval.rungs:
            with stage("rung from_scratch", log):
                sc, n = train_rung("from scratch", None, True, cfg.train.scratch_learning_rate, False)
                desc = f"same architecture, random init, same data and budget (max {cfg.train.epochs} epochs, early stopping), lr {cfg.train.scratch_learning_rate:g}; constrained scoring"
                rung("from_scratch", desc, sc.model, [], n, sc.train_seconds, history=sc.history, best_epoch=sc.best_epoch, stopped=sc.stopped, learning_rate=cfg.train.scratch_learning_rate)
                del sc

        # ---- learning curve (stratified nested subsets)
        curve, curve_seconds = learning_curve_evidence(
            cfg, log, y["train"], lambda label, subset: train_rung(label, subset, False, ft_lr, lora),
            lambda model: classification_metrics(y["test"], lm_classify.label_scores(model, tokenizer, prompt, texts["test"], [], bs, bf16).argmax(1), labels, boot, primary),
            ft_row, ft.epochs_run, boots["fine_tuned"], primary)

        # ---- retention and domain shift, as perplexity
        tuned = ft.model
        with stage("retention and domain shift", log):
            retention_, shift = perplexity_evidence(cfg, base, tuned, tokenizer, texts["train"], bf16)

        # ---- the model folder: the merged model and how to prompt and score it
        with stage("save model", log):
            model_dir = save_model(tmp, tuned, tokenizer, ft.adapter)
            prompt.save(model_dir)
            (tmp / "logs" / "predictions.jsonl").write_text("".join(
                json.dumps({"row": e.row, "text": e.text, "label": e.label, **{r: labels[predictions[r][i]] for r in predictions}}, ensure_ascii=False) + "\n"
                for i, e in enumerate(splits.test)
            ))

        # ---- size, speed and cost per request
        with stage("measure size, latency and cost per request", log):
            test_chats = [prompt.messages(t) for t in texts["test"]]
            inf = size_and_latency(cfg, base, tuned, tokenizer, model_path, model_dir, test_chats, limit, bf16, lora)
            k = max(1, min(LATENCY_REQUESTS, cfg.evidence.latency_repeats, len(test_chats)))
            per_request = {
                "few_shot": lm_classify.request_seconds(base, tokenizer, prompt, texts["test"][:k], shots, bf16),
                "fine_tuned": lm_classify.request_seconds(tuned, tokenizer, prompt, texts["test"][:k], [], bf16),
            }
            inf["per_request"] = per_request

        hardware = models.hardware_description()
        cost_ = verdict.cost(ladder, hardware, os.cpu_count() or 1, cfg.evidence.price_per_hour, curve_seconds, "classification")
        cost_.update(break_even(cost_, per_request))
        verdict_ = verdict.verdict(ladder, boots, primary, retention_, audit, curve, cost_)
        verdict_["gates"] = retention_gate(retention_, cfg.evidence.max_forgetting)
        report = {
            "fmtune_version": __version__,
            "run": {"name": name, "status": "complete", "started_at": started.isoformat(timespec="seconds"), "finished_at": None,
                    "wall_seconds": None, "seed": seed, "command": command, "stages": log},
            "task": {"type": "classification", "primary_metric": primary, "labels": labels, "model_kind": "causal_lm", "prompt": prompt.to_dict()},
            "data": {"train": len(y["train"]), "validation": len(y["validation"]), "test": len(y["test"]), "sha256": splits.sha256,
                     "files": splits.files, "dropped": splits.dropped, "truncated": truncated, "audit": audit},
            "base_model": {"name": model_name, "path": str(model_path), "parameters": models.count_parameters(base),
                           "sha256": models.weights_hash(model_path), "architecture": type(base).__name__, "max_length": max_length},
            "choices": choices,
            "levers": dict(ft.levers),
            "ladder": ladder,
            "skipped_rungs": skipped,
            "retention": retention_,
            "domain_shift": shift,
            "learning_curve": curve,
            "cost": cost_,
            "inference": inf,
            "verdict": verdict_,
        }
        finish(report, cfg, tmp, out, wall_start, model_path, io_start)
    except BaseException as exc:
        mark_interrupted(tmp, out, resumable=False)
        record(out, name, "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed", work_dir=tmp)
        raise
    return summarise(report, out, show_summary)


# ---------------------------------------------------------------- stages both causal-LM runs share


def start_run(cfg: RunConfig) -> tuple[str, Path, Path]:
    """(name, final folder, temporary folder): the config written, torch threads set, the run recorded as running."""
    import torch

    name = run_name(cfg)
    out, tmp, resuming = open_run_dir(cfg, name)  # the same folder rules as every run: a stable partial folder, --overwrite/--resume checked
    if resuming:  # an unfinished run of this configuration (its config.yaml matched): causal-LM training keeps no checkpoints yet
        console.print(f"[yellow]note:[/] {tmp} holds an unfinished causal-LM run of this configuration; causal-LM runs keep no checkpoints, so it starts again from the beginning.")
        shutil.rmtree(tmp)
    (tmp / "logs").mkdir(parents=True)
    (tmp / "config.yaml").write_text(to_yaml(cfg))
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    record(out, name, "running", work_dir=tmp)
    return name, out, tmp


def load_base(cfg: RunConfig, device):
    """(folder, display name, tokenizer, where its chat template came from, base model on `device`)."""
    from fmtune import causal_lm

    model_path, model_name = causal_lm.resolve_model(cfg.model.model)
    tokenizer = causal_lm.load_tokenizer(model_path)
    template_why = causal_lm.ensure_chat_template(tokenizer)
    return model_path, model_name, tokenizer, template_why, causal_lm.load_model(model_path).to(device)


def fit_rung(cfg: RunConfig, model_path: Path, device, label: str, train: list, validation: list, *, lr: float, lora: bool, from_scratch: bool,
             pad_id: int, bf16: bool):
    """A fresh copy of the base model (or its architecture, randomly initialised) trained on the rows, with a progress bar."""
    import torch

    from fmtune import causal_lm

    torch.manual_seed(cfg.seed)
    model = causal_lm.load_model(model_path, from_scratch=from_scratch).to(device)
    with progress_bar() as prog:
        task = prog.add_task(label, total=len(train) * cfg.train.epochs, info="")

        def progress(n: int, row: dict) -> None:
            prog.advance(task, n)
            if row:
                prog.update(task, info=f"epoch {row['epoch']} val loss {row['val_loss']:.3f}")

        return causal_lm.fit(model, train, validation, cfg.train, pad_id=pad_id, learning_rate=lr, seed=cfg.seed, bf16=bf16, lora=lora,
                             eval_batch_size=cfg.eval.eval_batch_size, progress=progress)


def learning_curve_evidence(cfg: RunConfig, log: list[str], groups: np.ndarray, train_subset: Callable, evaluate: Callable[[Any], dict], ft_row: dict, ft_epochs: int,
                            ft_boot: np.ndarray, primary: str) -> tuple[dict, float]:
    """(learning_curve block, training seconds): nested subsets stratified by `groups`, each trained by
    `train_subset(label, indices) -> (TrainResult, n)` and scored by `evaluate(model)` (metrics, ci95, _boot_primary);
    the fine_tuned rung is the 100% point."""
    from fmtune import learning_curve

    if not cfg.evidence.curve:
        return {"metric": primary, "points": [], "skipped": "turned off with --no-curve"}, 0.0
    points, curve_boots, seconds = [], [], 0.0
    with stage("learning curve", log):
        for frac, subset in learning_curve.nested_subsets(groups, cfg.evidence.curve_fractions, cfg.seed).items():
            res, n = train_subset(f"curve {frac:.1%}", subset)
            m = evaluate(res.model)
            seconds += res.train_seconds
            points.append({"fraction": frac, "train_examples": n, "metric": m["metrics"][primary], "ci95": m["ci95"][primary], "train_seconds": round(res.train_seconds, 3), "epochs": res.epochs_run})
            curve_boots.append(m["_boot_primary"])
            del res
    points.append({"fraction": 1.0, "train_examples": ft_row["train_examples"], "metric": ft_row["metrics"][primary], "ci95": ft_row["ci95"][primary], "train_seconds": ft_row["train_seconds"], "epochs": ft_epochs})
    curve_boots.append(ft_boot)
    return {"metric": primary, "points": points, "forecast": learning_curve.forecast(points, curve_boots, cfg.evidence.target_metric)}, seconds


def perplexity_evidence(cfg: RunConfig, base, tuned, tokenizer, task_texts: list[str], bf16: bool) -> tuple[dict, dict]:
    """Retention (general-text perplexity, base vs tuned) and domain shift (task text vs general text, base model)."""
    from fmtune import causal_lm, retention

    bs = cfg.eval.eval_batch_size
    docs, source = retention.general_documents(cfg.evidence.general_text)
    nll_base, n_chunks = causal_lm.text_nll(base, tokenizer, docs, RETENTION_CHUNK_TOKENS, RETENTION_CHUNKS, bs, bf16)
    nll_tuned, _ = causal_lm.text_nll(tuned, tokenizer, docs, RETENTION_CHUNK_TOKENS, RETENTION_CHUNKS, bs, bf16)
    retention_ = perplexity_retention(float(np.exp(nll_base)), float(np.exp(nll_tuned)), n_chunks, source, cfg.evidence.max_forgetting)
    nll_task, task_chunks = causal_lm.text_nll(base, tokenizer, task_texts, RETENTION_CHUNK_TOKENS, RETENTION_CHUNKS, bs, bf16)
    return retention_, perplexity_shift(float(np.exp(nll_task)), float(np.exp(nll_base)), task_chunks, n_chunks, source)


def save_model(tmp: Path, tuned, tokenizer, adapter: dict | None) -> Path:
    """model/ (merged, plain transformers, safetensors) and, for LoRA, adapter/ beside it; returns model/."""
    model_dir = tmp / "model"
    tuned.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    if adapter is not None:
        from safetensors.torch import save_file

        adapter_dir = tmp / "adapter"
        adapter["config"].save_pretrained(adapter_dir)
        save_file(adapter["state"], str(adapter_dir / "adapter_model.safetensors"))
    return model_dir


def size_and_latency(cfg: RunConfig, base, tuned, tokenizer, model_path: Path, model_dir: Path, chats: list[list[dict]], max_length: int, bf16: bool, lora: bool) -> dict:
    """Parameters, size on disk and forward-pass latency of base and tuned on the same test prompts (chat template)."""
    from fmtune import causal_lm, inference

    prompts = [causal_lm.render(tokenizer, c)[0] for c in chats[:64]]
    reps = cfg.evidence.latency_repeats
    return {
        "base": inference.describe(base, model_path, inference.latency(base, tokenizer, prompts, max_length, bf16, reps, batch_size=LATENCY_BATCH)),
        "fine_tuned": inference.describe(tuned, model_dir, inference.latency(tuned, tokenizer, prompts, max_length, bf16, reps, batch_size=LATENCY_BATCH)),
        "note": "Same inputs (test prompts in the chat template), same precision, same threads: one forward pass"
        + (", with the LoRA adapters merged into the weights (same architecture, same size as the base)." if lora else "."),
    }


def summarise(report: dict, out: Path, show_summary: bool = True) -> Path:
    """Print the ladder; raise GateFailed when the run failed --max-forgetting."""
    if show_summary:
        print_summary(report, out)
    raise_if_gate_failed(report, out)
    return out


def _generation_audit(audit: dict, splits, prompt_overlap: int) -> dict:
    """Add what only pairs have to the audit (run with classes=False): prompts seen in train, ignored chat turns."""
    audit = dict(audit)
    audit["checked_on"] = "prompt and completion together (duplicates, train/test overlap, PII)"
    audit["test_prompts_in_train"] = prompt_overlap
    warnings = list(audit["warnings"])
    if prompt_overlap:
        warnings.append(f"{prompt_overlap} test prompts also appear as training prompts (possibly with another completion): scores on them may be optimistic.")
    if splits.after_target:
        audit["messages_after_target"] = splits.after_target
        warnings.append(f"{splits.after_target} conversations have messages after their last assistant message; those are ignored (the last assistant message is the target).")
    audit["warnings"] = warnings
    return audit


def perplexity_retention(base: float, tuned: float, chunks: int, source: str, max_forgetting: float | None) -> dict:
    from fmtune.retention import DEFAULT_THRESHOLD, forgetting

    rel = (tuned - base) / base
    threshold = max_forgetting if max_forgetting is not None else DEFAULT_THRESHOLD
    return {
        "probe": f"perplexity on general text ({chunks} chunks of {RETENTION_CHUNK_TOKENS} tokens)",
        "base": base,
        "fine_tuned": tuned,
        "relative_change": rel,
        "higher_is_better": False,
        "flag": bool(forgetting({"relative_change": rel, "higher_is_better": False}) > threshold),
        "threshold": threshold,
        "gate": max_forgetting,
        "explanation": (
            f"Probe: the models' perplexity on {chunks} chunks of {RETENTION_CHUNK_TOKENS} tokens of general-domain text ({source}); "
            f"lower is better. Base {base:.2f}, fine-tuned {tuned:.2f} ({rel:+.1%}). A rise means the tuned model predicts "
            f"general text worse: it forgot some general knowledge. Worry when it rises by more than {threshold:.0%}"
            + (" (your --max-forgetting gate)." if max_forgetting is not None else " (default warning threshold; set a hard gate with --max-forgetting).")
        ),
        "details": {"chunks": chunks, "chunk_tokens": RETENTION_CHUNK_TOKENS, "source": source},
    }


def perplexity_shift(task_ppl: float, general_ppl: float, task_chunks: int, general_chunks: int, source: str) -> dict:
    ratio = task_ppl / general_ppl
    if ratio < 1.0:
        words = "the base model finds the task text easier to predict than general text: it already knows this kind of text; gains from fine-tuning come mostly from the task's format and answers"
    elif ratio < 2.0:
        words = "moderately harder to predict than general text: fine-tuning is likely to help"
    else:
        words = "much harder to predict than general text: the task text is far from what the base model knows, so fine-tuning is expected to help most"
    return {
        "method": f"perplexity ratio: the base model's perplexity on the training prompts and completions divided by its perplexity on general text (chunks of {RETENTION_CHUNK_TOKENS} tokens; 1 = as familiar as general text)",
        "score": ratio,
        "interpretation": f"ratio {ratio:.2f}: {words}.",
        "details": {"task_perplexity": task_ppl, "general_perplexity": general_ppl, "task_chunks": task_chunks, "general_chunks": general_chunks, "general_source": source},
    }


def break_even(cost_: dict, per_request: dict) -> dict:
    """Requests after which training paid for itself: train_cost / (cost per few-shot request - cost per tuned request)."""
    price_s = cost_["price_per_hour"] / 3600
    few, tuned = per_request["few_shot"]["mean_s"] * price_s, per_request["fine_tuned"]["mean_s"] * price_s
    out = {"cost_per_request_few_shot": few, "cost_per_request_fine_tuned": tuned}
    saving = few - tuned
    if saving <= 0:
        out["break_even_requests"] = None
        out["break_even_reason"] = (
            f"no saving per request: a few-shot request took {per_request['few_shot']['mean_s']:.3f} s and a fine-tuned one "
            f"{per_request['fine_tuned']['mean_s']:.3f} s (batch 1, mean of {per_request['fine_tuned']['requests']}), so the shorter "
            "prompts do not pay the training back; its value is the quality gain"
        )
    else:
        out["break_even_requests"] = float(np.ceil(cost_["train_cost"] / saving))
        out["break_even_reason"] = (
            f"few-shot prompts average {per_request['few_shot']['mean_prompt_tokens']:.0f} tokens against {per_request['fine_tuned']['mean_prompt_tokens']:.0f} "
            f"for the tuned model: {per_request['few_shot']['mean_s']:.3f} s vs {per_request['fine_tuned']['mean_s']:.3f} s per request (batch 1), "
            f"so training cost ${cost_['train_cost']:.4f} is recovered after about {int(out['break_even_requests'])} requests"
        )
    return out
