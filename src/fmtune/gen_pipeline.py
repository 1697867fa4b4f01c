"""Causal-LM runs. Generation: prompt/completion (or chat) data -> audit -> ladder (zero_shot, few_shot, fine_tuned,
from_scratch) -> learning curve, retention and domain shift as perplexity, cost with break-even, size/latency -> verdict
-> run folder. Classification with a causal LM (run_lm_classification): text/label data, the label word as the answer,
constrained scoring over the label set (fmtune.lm_classify), the same evidence.

The same run folder and report.json contract as classification (fmtune.pipeline); its helpers are reused, not copied,
and the stages both causal-LM runs share follow each run's own stages (_gen_*, _cls_*).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
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
from fmtune.runner.folder import disk_io, marked_on_failure, open_run_dir, record, run_name
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
    r = _gen_start(cfg, command)
    with marked_on_failure(r.out, r.tmp, r.name, resumable=False):
        _gen_prepare(r)
        _gen_no_training_rungs(r)
        ft, ft_row = _gen_trained_rungs(r)
        curve, curve_seconds = _gen_learning_curve(r, ft, ft_row)
        with stage("retention and domain shift", r.log):
            retention_, shift = perplexity_evidence(cfg, r.base, ft.model, r.tokenizer, [f"{p.prompt}\n{p.completion}" for p in r.pairs["train"]], r.bf16)
        inf = _gen_save_and_measure(r, ft)
        report = _gen_report(r, ft, curve, curve_seconds, retention_, shift, inf)
        finish(report, cfg, r.tmp, r.out, r.wall_start, r.model_path, r.io_start)
    return summarise(report, r.out, show_summary)


@dataclass
class _GenRun:
    """What the stages of a generation run share: set by _gen_start and _gen_prepare, then read (the ladder, its
    bootstrap draws and the generations grow as rungs finish)."""

    cfg: RunConfig
    command: str
    primary: str
    started: datetime
    wall_start: float
    io_start: dict | None
    log: list[str]
    name: str
    out: Path
    tmp: Path
    device: Any
    splits: Any = None
    pairs: dict = field(default_factory=dict)
    model_path: Path | None = None
    model_name: str = ""
    tokenizer: Any = None
    base: Any = None
    pad_id: int = 0
    bf16: bool = False
    limit: int = 0
    max_length: int = 0
    audit: dict = field(default_factory=dict)
    enc: dict = field(default_factory=dict)
    truncated: dict = field(default_factory=dict)
    choices: list[dict] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    boot: Any = None
    ladder: list[dict] = field(default_factory=list)
    boots: dict = field(default_factory=dict)
    generations: dict = field(default_factory=dict)
    test_chats: list = field(default_factory=list)
    shot_chats: list = field(default_factory=list)  # the few-shot prompts: also the break-even's

    @property
    def seed(self) -> int:
        return self.cfg.seed


def _gen_start(cfg: RunConfig, command: str) -> _GenRun:
    """The primary metric checked, the run folder opened (before any data is read)."""
    from transformers.utils import logging as hf_logging

    from fmtune import models

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    primary = primary_metric(cfg)
    started, wall_start, io_start = datetime.now(timezone.utc), time.perf_counter(), disk_io()
    name, out, tmp = start_run(cfg)
    return _GenRun(cfg, command, primary, started, wall_start, io_start, [], name, out, tmp, models.default_device())


def _gen_prepare(r: _GenRun) -> None:
    """Data, base model and audit; the pairs encoded at the chosen max_length; the first choices; the bootstrap draws."""
    from fmtune import causal_lm, gen_data
    from fmtune.evaluate import bootstrap_indices

    cfg = r.cfg
    with stage("load and split data", r.log):
        splits = gen_data.load_pairs(cfg.data, r.seed)
        redacted: dict[str, int] = {}
        if cfg.data.redact_pii:
            splits, redacted = gen_data.redact(splits)
    r.splits = splits
    with stage("load the base model", r.log):
        r.model_path, r.model_name, r.tokenizer, template_why, r.base = load_base(cfg, r.device)
    r.pad_id, r.bf16 = _pad_and_bf16(cfg, r.tokenizer, r.device)
    r.pairs = {s: getattr(splits, s) for s in ("train", "validation", "test")}
    with stage("audit data", r.log):
        max_length_why = _gen_audit(r, redacted)
    r.enc = {s: [causal_lm.encode(r.tokenizer, p.chat(), p.completion, r.max_length) for p in ps] for s, ps in r.pairs.items()}
    r.truncated = {s: sum(e.truncated for e in rows) for s, rows in r.enc.items()}
    r.choices = [
        {"setting": "max_length", "value": r.max_length, "why": f"{max_length_why} (prompt + completion in the chat template; over it the prompt loses its start, the completion keeps at least half)"},
        {"setting": "chat_template", "value": True, "why": template_why},
        {"setting": "loss", "value": "completion tokens only", "why": "prompt and template tokens are masked (labels -100): the model learns the answers, not the questions"},
        _bf16_choice(cfg, r.bf16),
        {"setting": "primary_metric", "value": r.primary, "why": "--metric" if cfg.eval.metric else f"default for generation ({DEFAULT_METRIC}: longest-common-subsequence F1 on normalised words)"},
    ]
    r.references = [p.completion for p in r.pairs["test"]]
    r.boot = bootstrap_indices(len(r.references), cfg.eval.bootstrap, r.seed)


def _gen_audit(r: _GenRun, redacted: dict[str, int]) -> str:
    """Token lengths of whole pairs, the model's limit, max_length and the audit; returns why that max_length."""
    from fmtune import audit as audit_mod
    from fmtune import causal_lm, gen_data

    full = {s: [causal_lm.encode(r.tokenizer, p.chat(), p.completion) for p in ps] for s, ps in r.pairs.items()}
    lengths = {s: [len(e.input_ids) for e in enc] for s, enc in full.items()}
    r.limit = model_token_limit(r.base.config, r.tokenizer)
    r.max_length, max_length_why = choose_max_length(lengths["train"], r.limit, r.cfg.model.max_length)
    audit = audit_mod.audit(r.splits.for_audit(), token_lengths=lengths, max_length=r.max_length, redacted=redacted, model_limit=r.limit, classes=False)
    r.audit = _generation_audit(audit, r.splits, gen_data.prompt_overlap(r.splits))
    return max_length_why


def _gen_rung(r: _GenRun, rung_name: str, description: str, model, conversations: list[list[dict]], scored: list, train_examples: int, train_seconds: float,
              **extra) -> dict:
    """Generate answers to the test conversations, score them (and the completions' loss), add the row to the ladder."""
    from fmtune import causal_lm
    from fmtune.gen_metrics import generation_metrics

    new_tokens, bs = r.cfg.eval.max_new_tokens, r.cfg.eval.eval_batch_size
    with progress_bar() as prog:
        task = prog.add_task(f"{rung_name}: generating", total=len(conversations), info="")
        t0 = time.perf_counter()
        preds = causal_lm.generate(model, r.tokenizer, conversations, new_tokens, bs, r.bf16, r.limit - new_tokens, lambda n: prog.advance(task, n))
        gen_s = time.perf_counter() - t0
    nll = causal_lm.completion_nll(model, scored, r.pad_id, bs, r.bf16)
    m = generation_metrics(preds, r.references, nll, r.boot, r.primary)
    r.boots[rung_name] = m.pop("_boot_primary")
    r.generations[rung_name] = preds
    row = {"name": rung_name, "description": description, **m, "train_examples": int(train_examples), "train_seconds": round(float(train_seconds), 3), "eval_seconds": round(gen_s, 3), **extra}
    r.ladder.append(row)
    return row


def _gen_no_training_rungs(r: _GenRun) -> None:
    """zero_shot and few_shot: the base model prompted; the few-shot prompts are kept for the break-even."""
    from fmtune import causal_lm

    cfg, new_tokens = r.cfg, r.cfg.eval.max_new_tokens
    r.test_chats = [p.chat() for p in r.pairs["test"]]
    if "zero_shot" in cfg.eval.rungs:
        with stage("rung zero_shot", r.log):
            _gen_rung(r, "zero_shot", "the base model answers the prompt alone (chat template, greedy decoding)", r.base, r.test_chats, r.enc["test"], 0, 0.0)
    shots, shots_why = choose_shots(r.tokenizer, r.pairs["train"], r.pairs["test"], cfg.eval.few_shot_k, r.limit - new_tokens, r.seed)
    r.shot_chats = [few_shot_conversation(shots, c) for c in r.test_chats]
    if "few_shot" in cfg.eval.rungs:
        with stage("rung few_shot", r.log):
            shot_scored = [causal_lm.encode(r.tokenizer, c, p.completion) for c, p in zip(r.shot_chats, r.pairs["test"])]
            _gen_rung(r, "few_shot", f"the base model with {len(shots)} training pairs as previous chat turns in every prompt", r.base, r.shot_chats, shot_scored, len(shots), 0.0)
        r.choices.append({"setting": "few_shot_k", "value": len(shots), "why": shots_why})


def _gen_train(r: _GenRun, label: str, subset: np.ndarray | None, from_scratch: bool, lr: float, use_lora: bool):
    """(TrainResult, n): the training pairs (all, or `subset`) fitted by fit_rung."""
    idx = np.arange(len(r.enc["train"])) if subset is None else subset
    return fit_rung(r.cfg, r.model_path, r.device, label, [r.enc["train"][i] for i in idx], r.enc["validation"], lr=lr, lora=use_lora,
                    from_scratch=from_scratch, pad_id=r.pad_id, bf16=r.bf16), len(idx)


def _gen_trained_rungs(r: _GenRun):
    """(fine-tuning result, its ladder row): fine_tuned (LoRA by default) and, when asked, from_scratch."""
    cfg = r.cfg
    lora, method, ft_lr = _tuning_method(cfg)
    with stage(f"rung fine_tuned ({method})", r.log):
        ft, n = _gen_train(r, "fine-tuning", None, False, ft_lr, lora)
        desc = f"{'LoRA (r=' + str(cfg.train.lora_r) + ', merged)' if lora else 'full'} fine-tuning of the base model on all training pairs, loss on the completions, best validation-loss epoch ({ft.best_epoch} of {ft.epochs_run})"
        ft_row = _gen_rung(r, "fine_tuned", desc, ft.model, r.test_chats, r.enc["test"], n, ft.train_seconds, history=ft.history, best_epoch=ft.best_epoch, stopped=ft.stopped, learning_rate=ft_lr, method=method)
        (r.tmp / "logs" / "history_fine_tuned.jsonl").write_text("".join(json.dumps(h) + "\n" for h in ft.history))
    r.choices.append({"setting": "epochs", "value": ft.best_epoch, "why": f"{ft.stopped}; best validation loss at epoch {ft.best_epoch} (max {cfg.train.epochs}, patience {cfg.train.patience})"})
    r.choices.append(_learning_rate_choice(cfg, lora, ft_lr))
    if "from_scratch" in cfg.eval.rungs:
        with stage("rung from_scratch", r.log):
            sc, n = _gen_train(r, "from scratch", None, True, cfg.train.scratch_learning_rate, False)
            desc = f"same architecture, random init, same data and budget (max {cfg.train.epochs} epochs, early stopping), lr {cfg.train.scratch_learning_rate:g}"
            _gen_rung(r, "from_scratch", desc, sc.model, r.test_chats, r.enc["test"], n, sc.train_seconds, history=sc.history, best_epoch=sc.best_epoch, stopped=sc.stopped, learning_rate=cfg.train.scratch_learning_rate)
            del sc
    return ft, ft_row


def _gen_learning_curve(r: _GenRun, ft, ft_row: dict) -> tuple[dict, float]:
    """One group: nested random subsets, each fine-tuned like fine_tuned and scored on its generations."""
    from fmtune import causal_lm
    from fmtune.gen_metrics import generation_metrics

    lora, _, ft_lr = _tuning_method(r.cfg)
    new_tokens, bs = r.cfg.eval.max_new_tokens, r.cfg.eval.eval_batch_size
    return learning_curve_evidence(
        r.cfg, r.log, np.zeros(len(r.enc["train"]), dtype=np.int64), lambda label, subset: _gen_train(r, label, subset, False, ft_lr, lora),
        lambda model: generation_metrics(causal_lm.generate(model, r.tokenizer, r.test_chats, new_tokens, bs, r.bf16, r.limit - new_tokens), r.references, None, r.boot, r.primary),
        ft_row, ft.epochs_run, r.boots["fine_tuned"], r.primary)


def _gen_save_and_measure(r: _GenRun, ft) -> dict:
    """The model folder and the generations log; size, latency and per-request seconds (the `inference` block)."""
    from fmtune import causal_lm

    tuned, new_tokens = ft.model, r.cfg.eval.max_new_tokens
    with stage("save model", r.log):
        model_dir = save_model(r.tmp, tuned, r.tokenizer, ft.adapter)
        (r.tmp / "logs" / "generations.jsonl").write_text("".join(
            json.dumps({"row": p.row, "prompt": p.prompt, "reference": p.completion, **{g: r.generations[g][i] for g in r.generations}}, ensure_ascii=False) + "\n"
            for i, p in enumerate(r.pairs["test"])
        ))
    with stage("measure size, latency and cost per request", r.log):
        inf = size_and_latency(r.cfg, r.base, tuned, r.tokenizer, r.model_path, model_dir, r.test_chats, r.max_length, r.bf16, _tuning_method(r.cfg)[0])
        k = max(1, min(LATENCY_REQUESTS, r.cfg.evidence.latency_repeats, len(r.test_chats)))
        inf["per_request"] = {
            "few_shot": causal_lm.request_seconds(r.base, r.tokenizer, r.shot_chats[:k], new_tokens, r.bf16),
            "fine_tuned": causal_lm.request_seconds(tuned, r.tokenizer, r.test_chats[:k], new_tokens, r.bf16),
        }
    return inf


def _gen_report(r: _GenRun, ft, curve: dict, curve_seconds: float, retention_: dict, shift: dict, inf: dict) -> dict:
    cost_, verdict_ = _cost_and_verdict(r, "generation", curve, curve_seconds, retention_, inf["per_request"])
    return {
        "fmtune_version": __version__,
        "run": _run_block(r),
        "task": {"type": "generation", "primary_metric": r.primary, "max_new_tokens": r.cfg.eval.max_new_tokens, "decoding": "greedy"},
        "data": {"train": len(r.pairs["train"]), "validation": len(r.pairs["validation"]), "test": len(r.pairs["test"]), "sha256": r.splits.sha256,
                 "files": r.splits.files, "dropped": r.splits.dropped, "truncated": r.truncated, "audit": r.audit},
        "base_model": _base_model_block(r),
        "choices": r.choices,
        "levers": dict(ft.levers),
        "ladder": r.ladder,
        "retention": retention_,
        "domain_shift": shift,
        "learning_curve": curve,
        "cost": cost_,
        "inference": inf,
        "verdict": verdict_,
    }


def run_lm_classification(cfg: RunConfig, command: str = "fmtune run", show_summary: bool = True) -> Path:
    """Classification with a causal LM: text/label data, each text a chat whose answer is its label word (LoRA by default),
    constrained scoring over the label set (fmtune.lm_classify). The classification metrics, CIs and verdict of
    fmtune.pipeline; retention, domain shift, cost per request and latency as in run_generation."""
    r = _cls_start(cfg, command)
    with marked_on_failure(r.out, r.tmp, r.name, resumable=False):
        _cls_prepare(r)
        _cls_no_training_rungs(r)
        ft, ft_row = _cls_trained_rungs(r)
        curve, curve_seconds = _cls_learning_curve(r, ft, ft_row)
        with stage("retention and domain shift", r.log):
            retention_, shift = perplexity_evidence(cfg, r.base, ft.model, r.tokenizer, r.texts["train"], r.bf16)
        inf = _cls_save_and_measure(r, ft)
        report = _cls_report(r, ft, curve, curve_seconds, retention_, shift, inf)
        finish(report, cfg, r.tmp, r.out, r.wall_start, r.model_path, r.io_start)
    return summarise(report, r.out, show_summary)


@dataclass
class _ClsRun:
    """What the stages of a causal-LM classification run share: set by _cls_start and _cls_prepare, then read (the
    ladder, its bootstrap draws and the predictions grow as rungs finish)."""

    cfg: RunConfig
    command: str
    primary: str
    started: datetime
    wall_start: float
    io_start: dict | None
    log: list[str]
    splits: Any
    redacted: dict[str, int]
    name: str
    out: Path
    tmp: Path
    device: Any
    model_path: Path | None = None
    model_name: str = ""
    tokenizer: Any = None
    base: Any = None
    pad_id: int = 0
    bf16: bool = False
    texts: dict = field(default_factory=dict)  # cut to max_length once it is chosen
    y: dict = field(default_factory=dict)
    limit: int = 0
    max_length: int = 0
    audit: dict = field(default_factory=dict)
    prompt: Any = None
    truncated: dict = field(default_factory=dict)
    class_weight: Any = None
    choices: list[dict] = field(default_factory=list)
    boot: Any = None
    ladder: list[dict] = field(default_factory=list)
    boots: dict = field(default_factory=dict)
    predictions: dict = field(default_factory=dict)
    shots: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)
    rows: dict = field(default_factory=dict)  # training and validation rows: the label word as the answer

    @property
    def seed(self) -> int:
        return self.cfg.seed

    @property
    def labels(self) -> list[str]:
        return self.splits.labels


def _cls_start(cfg: RunConfig, command: str) -> _ClsRun:
    """Data loaded and checked (input problems stop the run before any folder is created), then the run folder opened."""
    from transformers.utils import logging as hf_logging

    from fmtune import audit as audit_mod
    from fmtune import data, models
    from fmtune.runner.ladder import classification_primary

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    primary = classification_primary(cfg)
    started, wall_start, io_start = datetime.now(timezone.utc), time.perf_counter(), disk_io()
    log: list[str] = []
    with stage("load and split data", log):
        splits = data.load_splits(cfg.data, cfg.seed)
        redacted: dict[str, int] = {}
        if cfg.data.redact_pii:
            splits, redacted = audit_mod.redact_splits(splits)
        labels = splits.labels
        unknown = sorted(set(cfg.data.label_descriptions) - set(labels))
        if unknown:
            raise ConfigError(f"--label-descriptions names label(s) {unknown} that the data does not have; labels are {labels}.")
    name, out, tmp = start_run(cfg)
    return _ClsRun(cfg, command, primary, started, wall_start, io_start, log, splits, redacted, name, out, tmp, models.default_device())


def _cls_prepare(r: _ClsRun) -> None:
    """Base model and audit; the texts cut to the chosen max_length; the prompt, class weights, first choices, bootstrap draws."""
    from fmtune import lm_classify, train
    from fmtune.evaluate import bootstrap_indices

    cfg, labels = r.cfg, r.labels
    with stage("load the base model", r.log):
        r.model_path, r.model_name, r.tokenizer, template_why, r.base = load_base(cfg, r.device)
    r.pad_id, r.bf16 = _pad_and_bf16(cfg, r.tokenizer, r.device)
    texts = {s: [e.text for e in getattr(r.splits, s)] for s in ("train", "validation", "test")}
    label_index = {lab: i for i, lab in enumerate(labels)}
    r.y = {s: np.array([label_index[e.label] for e in getattr(r.splits, s)], dtype=np.int64) for s in texts}
    with stage("audit data", r.log):
        overhead, max_length_why = _cls_audit(r, texts)
    r.prompt = lm_classify.LabelPrompt(tuple(labels), dict(cfg.data.label_descriptions), r.max_length)
    cut = {s: [lm_classify.cut(r.tokenizer, t, r.max_length) for t in ts] for s, ts in texts.items()}
    r.truncated = {s: sum(c for _, c in rows) for s, rows in cut.items()}
    r.texts = {s: [t for t, _ in rows] for s, rows in cut.items()}
    r.class_weight, cw_why = train.class_weight_vector(r.y["train"], len(labels), cfg.train.class_weights)
    r.choices = [
        {"setting": "max_length", "value": r.max_length, "why": f"{max_length_why} (tokens of the text alone; the instruction, label list and chat template add up to {overhead}; a longer text keeps its start)"},
        {"setting": "formulation", "value": "label word as the chat answer", "why": f"a causal LM classifies by answering: the user turn names the task and lists the labels as they appear in the data ({r.prompt.instruction()!r}), then the text; the answer is the label word"},
        {"setting": "scoring", "value": "constrained", "why": f"{lm_classify.SCORING}; no free generation, so every prediction is one of the labels"},
        {"setting": "chat_template", "value": True, "why": template_why},
        {"setting": "loss", "value": "label tokens only", "why": "prompt and template tokens are masked (labels -100): the model learns to answer with the label"},
        {"setting": "class_weights", "value": None if r.class_weight is None else [round(float(w), 4) for w in r.class_weight],
         "why": cw_why + ("; each training example's loss is weighted by its class's weight" if r.class_weight is not None else "")},
        _bf16_choice(cfg, r.bf16),
    ]
    r.boot = bootstrap_indices(len(r.y["test"]), cfg.eval.bootstrap, r.seed)


def _cls_audit(r: _ClsRun, texts: dict) -> tuple[int, str]:
    """Token lengths of the texts, the tokens the prompt takes, max_length and the audit; returns (that overhead, why that max_length)."""
    from fmtune import audit as audit_mod
    from fmtune import causal_lm, lm_classify

    tokenizer, labels = r.tokenizer, r.labels
    lengths = {s: [len(ids) for ids in tokenizer(t, add_special_tokens=False)["input_ids"]] if t else [] for s, t in texts.items()}
    limit = r.limit = model_token_limit(r.base.config, tokenizer)
    bare = lm_classify.LabelPrompt(tuple(labels), dict(r.cfg.data.label_descriptions))
    overhead = max(len(causal_lm.encode(tokenizer, bare.messages(""), lab).input_ids) for lab in labels)
    if limit - overhead < 8:
        raise ConfigError(f"the instruction, the {len(labels)} labels and the chat template take {overhead} of the model's {limit} tokens, leaving no room "
                          "for the text. Fix: shorter --label-descriptions, or a model with a longer context.")
    r.max_length, max_length_why = choose_max_length(lengths["train"], limit - overhead, r.cfg.model.max_length)
    r.audit = audit_mod.audit(r.splits, token_lengths=lengths, max_length=r.max_length, redacted=r.redacted, model_limit=limit - overhead)
    return overhead, max_length_why


def _cls_rung(r: _ClsRun, rung_name: str, description: str, model, shots: list, train_examples: int, train_seconds: float, calibrated: bool = False, **extra) -> dict:
    """Scores the test split; with `calibrated` (the no-training rungs) the content-free texts and the validation split
    first, to choose raw or calibrated scores on validation (lm_classify.fit_calibration)."""
    from fmtune import lm_classify
    from fmtune.runner.ladder import classification_rung

    bs, texts, y = r.cfg.eval.eval_batch_size, r.texts, r.y
    calibration = None
    with progress_bar() as prog:
        if calibrated:
            n_cal = len(lm_classify.CONTENT_FREE) + len(texts["validation"])
            task = prog.add_task(f"{rung_name}: content-free and validation texts (calibration)", total=n_cal, info="")
            t0 = time.perf_counter()
            calibration = lm_classify.fit_calibration(model, r.tokenizer, r.prompt, shots, texts["validation"], y["validation"], bs, r.bf16, lambda n: prog.advance(task, n))
            extra["calibration"] = {**calibration.to_dict(r.labels), "seconds": round(time.perf_counter() - t0, 3)}
            r.choices.append({"setting": f"calibration_{rung_name}", "value": "calibrated" if calibration.applied else "raw", "why": calibration.why})
            if calibration.applied:
                description += "; contextually calibrated (each label's log-probability minus its mean after content-free texts, chosen on validation)"
        task = prog.add_task(f"{rung_name}: scoring the labels", total=len(texts["test"]), info="")
        t0 = time.perf_counter()
        scores = lm_classify.label_scores(model, r.tokenizer, r.prompt, texts["test"], shots, bs, r.bf16, lambda n: prog.advance(task, n))
        eval_s = time.perf_counter() - t0
    if calibration is not None:
        scores = calibration.apply(scores)
    r.predictions[rung_name] = scores.argmax(1)
    row, r.boots[rung_name] = classification_rung(rung_name, description, y["test"], r.predictions[rung_name], r.labels, r.boot, train_examples, train_seconds, r.primary,
                                                  eval_seconds=round(eval_s, 3), **extra)
    r.ladder.append(row)
    return row


def _cls_no_training_rungs(r: _ClsRun) -> None:
    """zero_shot and few_shot: the base model prompted (shots kept for the break-even); head_only noted as skipped."""
    from fmtune import lm_classify

    cfg, texts = r.cfg, r.texts
    if "zero_shot" in cfg.eval.rungs:
        with stage("rung zero_shot", r.log):
            _cls_rung(r, "zero_shot", "the base model, no labeled examples: the instruction and the label list, constrained scoring of the labels", r.base, [], 0, 0.0, calibrated=True)
    r.shots, per_class, shots_why = lm_classify.choose_shots(r.tokenizer, r.prompt, texts["train"], r.y["train"], texts["test"] + texts["validation"], cfg.eval.few_shot_k, r.limit, r.seed)
    if "few_shot" in cfg.eval.rungs:
        with stage("rung few_shot", r.log):
            _cls_rung(r, "few_shot", f"the base model with {per_class} labeled examples per class ({len(r.shots)} in all) as previous chat turns in every prompt, constrained scoring",
                      r.base, r.shots, len(r.shots), 0.0, calibrated=True, shots_per_class=per_class)
        r.choices.append({"setting": "few_shot_k", "value": per_class, "why": shots_why})
    if "head_only" in cfg.eval.rungs:
        r.skipped["head_only"] = ("not run for a causal LM: head_only is a linear head on a frozen encoder's embeddings; here the no-training rungs are the "
                                  "same model prompted (zero_shot, few_shot), and the report contract makes head_only optional")


def _cls_train(r: _ClsRun, label: str, subset: np.ndarray | None, from_scratch: bool, lr: float, use_lora: bool):
    """(TrainResult, n): the training rows (all, or `subset`) fitted by fit_rung."""
    idx = np.arange(len(r.rows["train"])) if subset is None else subset
    return fit_rung(r.cfg, r.model_path, r.device, label, [r.rows["train"][i] for i in idx], r.rows["validation"], lr=lr, lora=use_lora,
                    from_scratch=from_scratch, pad_id=r.pad_id, bf16=r.bf16), len(idx)


def _cls_trained_rungs(r: _ClsRun):
    """(fine-tuning result, its ladder row): the label word as the answer, loss on its tokens; fine_tuned and, when asked, from_scratch."""
    from fmtune import lm_classify

    cfg, labels, y = r.cfg, r.labels, r.y
    lora, method, ft_lr = _tuning_method(cfg)
    weights = None if r.class_weight is None else r.class_weight[y["train"]]
    r.rows = {"train": lm_classify.training_rows(r.tokenizer, r.prompt, r.texts["train"], [labels[i] for i in y["train"]], weights),
              "validation": lm_classify.training_rows(r.tokenizer, r.prompt, r.texts["validation"], [labels[i] for i in y["validation"]])}
    with stage(f"rung fine_tuned ({method})", r.log):
        ft, n = _cls_train(r, "fine-tuning", None, False, ft_lr, lora)
        desc = f"{'LoRA (r=' + str(cfg.train.lora_r) + ', merged)' if lora else 'full'} fine-tuning of the base model to answer with the label word, loss on the label tokens, best validation-loss epoch ({ft.best_epoch} of {ft.epochs_run}); zero-shot prompt, constrained scoring"
        ft_row = _cls_rung(r, "fine_tuned", desc, ft.model, [], n, ft.train_seconds, history=ft.history, best_epoch=ft.best_epoch, stopped=ft.stopped, learning_rate=ft_lr, method=method)
        (r.tmp / "logs" / "history_fine_tuned.jsonl").write_text("".join(json.dumps(h) + "\n" for h in ft.history))
    r.choices.append({"setting": "epochs", "value": ft.best_epoch, "why": f"{ft.stopped}; best validation loss (label tokens) at epoch {ft.best_epoch} (max {cfg.train.epochs}, patience {cfg.train.patience})"})
    r.choices.append(_learning_rate_choice(cfg, lora, ft_lr))
    if "from_scratch" in cfg.eval.rungs:
        with stage("rung from_scratch", r.log):
            sc, n = _cls_train(r, "from scratch", None, True, cfg.train.scratch_learning_rate, False)
            desc = f"same architecture, random init, same data and budget (max {cfg.train.epochs} epochs, early stopping), lr {cfg.train.scratch_learning_rate:g}; constrained scoring"
            _cls_rung(r, "from_scratch", desc, sc.model, [], n, sc.train_seconds, history=sc.history, best_epoch=sc.best_epoch, stopped=sc.stopped, learning_rate=cfg.train.scratch_learning_rate)
            del sc
    return ft, ft_row


def _cls_learning_curve(r: _ClsRun, ft, ft_row: dict) -> tuple[dict, float]:
    """Stratified nested subsets, each fine-tuned like fine_tuned and scored with the zero-shot prompt."""
    from fmtune import lm_classify
    from fmtune.evaluate import classification_metrics

    lora, _, ft_lr = _tuning_method(r.cfg)
    bs = r.cfg.eval.eval_batch_size
    return learning_curve_evidence(
        r.cfg, r.log, r.y["train"], lambda label, subset: _cls_train(r, label, subset, False, ft_lr, lora),
        lambda model: classification_metrics(r.y["test"], lm_classify.label_scores(model, r.tokenizer, r.prompt, r.texts["test"], [], bs, r.bf16).argmax(1), r.labels, r.boot, r.primary),
        ft_row, ft.epochs_run, r.boots["fine_tuned"], r.primary)


def _cls_save_and_measure(r: _ClsRun, ft) -> dict:
    """The model folder (the merged model and how to prompt and score it) and the predictions log; size, latency and
    per-request seconds (the `inference` block)."""
    from fmtune import lm_classify

    tuned, texts, labels = ft.model, r.texts, r.labels
    with stage("save model", r.log):
        model_dir = save_model(r.tmp, tuned, r.tokenizer, ft.adapter)
        r.prompt.save(model_dir)
        (r.tmp / "logs" / "predictions.jsonl").write_text("".join(
            json.dumps({"row": e.row, "text": e.text, "label": e.label, **{p: labels[r.predictions[p][i]] for p in r.predictions}}, ensure_ascii=False) + "\n"
            for i, e in enumerate(r.splits.test)
        ))
    with stage("measure size, latency and cost per request", r.log):
        test_chats = [r.prompt.messages(t) for t in texts["test"]]
        inf = size_and_latency(r.cfg, r.base, tuned, r.tokenizer, r.model_path, model_dir, test_chats, r.limit, r.bf16, _tuning_method(r.cfg)[0])
        k = max(1, min(LATENCY_REQUESTS, r.cfg.evidence.latency_repeats, len(test_chats)))
        inf["per_request"] = {
            "few_shot": lm_classify.request_seconds(r.base, r.tokenizer, r.prompt, texts["test"][:k], r.shots, r.bf16),
            "fine_tuned": lm_classify.request_seconds(tuned, r.tokenizer, r.prompt, texts["test"][:k], [], r.bf16),
        }
    return inf


def _cls_report(r: _ClsRun, ft, curve: dict, curve_seconds: float, retention_: dict, shift: dict, inf: dict) -> dict:
    cost_, verdict_ = _cost_and_verdict(r, "classification", curve, curve_seconds, retention_, inf["per_request"])
    return {
        "fmtune_version": __version__,
        "run": _run_block(r),
        "task": {"type": "classification", "primary_metric": r.primary, "labels": r.labels, "model_kind": "causal_lm", "prompt": r.prompt.to_dict()},
        "data": {"train": len(r.y["train"]), "validation": len(r.y["validation"]), "test": len(r.y["test"]), "sha256": r.splits.sha256,
                 "files": r.splits.files, "dropped": r.splits.dropped, "truncated": r.truncated, "audit": r.audit},
        "base_model": _base_model_block(r),
        "choices": r.choices,
        "levers": dict(ft.levers),
        "ladder": r.ladder,
        "skipped_rungs": r.skipped,
        "retention": retention_,
        "domain_shift": shift,
        "learning_curve": curve,
        "cost": cost_,
        "inference": inf,
        "verdict": verdict_,
    }


# ---------------------------------------------------------------- stages both causal-LM runs share


def _pad_and_bf16(cfg: RunConfig, tokenizer, device) -> tuple[int, bool]:
    """The padding id (0 when the tokenizer has none) and whether to run in bf16 (--bf16, or what the hardware supports)."""
    from fmtune import models

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return pad_id, {"on": True, "off": False}.get(cfg.train.bf16, models.bf16_supported(device))


def _bf16_choice(cfg: RunConfig, bf16: bool) -> dict:
    return {"setting": "bf16", "value": bf16, "why": f"--bf16 {cfg.train.bf16}" + (" (hardware supports bf16)" if bf16 and cfg.train.bf16 == "auto" else " (no bf16 speed-up detected)" if cfg.train.bf16 == "auto" else "")}


def _tuning_method(cfg: RunConfig) -> tuple[bool, str, float]:
    """(LoRA?, method name, fine-tuning learning rate): auto = LoRA for causal LMs, at 10x --learning-rate unless --lora-learning-rate."""
    lora = cfg.train.method in ("auto", "lora")
    ft_lr = (cfg.train.lora_learning_rate or cfg.train.learning_rate * 10) if lora else cfg.train.learning_rate
    return lora, "lora" if lora else "full", ft_lr


def _learning_rate_choice(cfg: RunConfig, lora: bool, ft_lr: float) -> dict:
    return {"setting": "learning_rate", "value": ft_lr, "why": "LoRA default: 10x --learning-rate" if lora and not cfg.train.lora_learning_rate else "--lora-learning-rate" if lora else "--learning-rate"}


def _cost_and_verdict(r, task_type: str, curve: dict, curve_seconds: float, retention_: dict, per_request: dict) -> tuple[dict, dict]:
    """The cost block (with the break-even against few-shot prompting) and the verdict with its --max-forgetting gate;
    `r` is a _GenRun or a _ClsRun."""
    from fmtune import models, verdict

    hardware = models.hardware_description()
    cost_ = verdict.cost(r.ladder, hardware, os.cpu_count() or 1, r.cfg.evidence.price_per_hour, curve_seconds, task_type)
    cost_.update(break_even(cost_, per_request))
    verdict_ = verdict.verdict(r.ladder, r.boots, r.primary, retention_, r.audit, curve, cost_)
    verdict_["gates"] = retention_gate(retention_, r.cfg.evidence.max_forgetting)
    return cost_, verdict_


def _run_block(r) -> dict:
    """report["run"] before finish() fills in the end time; `r` is a _GenRun or a _ClsRun."""
    return {"name": r.name, "status": "complete", "started_at": r.started.isoformat(timespec="seconds"), "finished_at": None,
            "wall_seconds": None, "seed": r.seed, "command": r.command, "stages": r.log}


def _base_model_block(r) -> dict:
    from fmtune import models

    return {"name": r.model_name, "path": str(r.model_path), "parameters": models.count_parameters(r.base),
            "sha256": models.weights_hash(r.model_path), "architecture": type(r.base).__name__, "max_length": r.max_length}


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
