"""Generation: prompt/completion (or chat) data, a causal LM answering in its chat template; zero_shot and few_shot
prompt the base model; scored on greedy answers (ROUGE-L by default) and the completions' loss."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from fmtune.config import RunConfig
from fmtune.console import progress_bar, stage
from fmtune.errors import ConfigError
from fmtune.tasks.base import Context, Prepared, Rung, Scored, Supports, scratch_words
from fmtune.tasks.causal import LATENCY_REQUESTS, CausalTask, bf16_choice
from fmtune.tasks.choices import choose_max_length

DEFAULT_METRIC = "rouge_l"


def primary_metric(cfg: RunConfig) -> str:
    from fmtune.evidence.gen_metrics import TEXT_METRICS

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
    from fmtune.models import causal_lm

    rng = np.random.default_rng(seed + 2)
    shots = [train[i] for i in rng.permutation(len(train))[: min(k, len(train))]]
    longest = max(test, key=lambda p: len(p.prompt))
    while shots and len(causal_lm.prompt_ids(tokenizer, few_shot_conversation(shots, longest.chat()))) > budget:
        shots.pop()
    why = f"{len(shots)} random training pairs as previous chat turns (--few-shot-k {k})"
    if len(shots) < min(k, len(train)):
        why += f", fewer so that the longest test prompt fits {budget} tokens (the context minus max_new_tokens)"
    return shots, why


ANSWER_MARGIN = 1.25  # the decoding budget: the longest training/validation answer x this, plus the end of turn and one token


def choose_max_new_tokens(tokenizer, completions: list[str], given: int | None, context: int) -> tuple[int, str]:
    """How many new tokens a greedy answer may take: --max-new-tokens, else from the answers the model learns to give
    (never the test references), at most half the context."""
    if given is not None:
        return given, "--max-new-tokens"
    lengths = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in completions] or [64]
    longest = max(lengths)
    budget = max(4, min(int(np.ceil(ANSWER_MARGIN * longest)) + 2, context // 2))
    return budget, (f"derived from the {len(lengths)} training and validation completions: the longest is {longest} tokens (median "
                    f"{int(np.median(lengths))}), x{ANSWER_MARGIN} + 2 for the end of turn = {budget}" + (f", capped at half the context ({context // 2})"
                    if budget == context // 2 else "") + "; decoding also stops at the end of turn; set --max-new-tokens to change it")


def generation_audit(audit: dict, splits, prompt_overlap: int) -> dict:
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
    if splits.earlier_assistant:
        audit["earlier_assistant_turns"] = splits.earlier_assistant
        warnings.append(f"{splits.earlier_assistant} conversations have earlier assistant messages of weight 1 (OpenAI's default), which OpenAI's fine-tuning "
                        "trains on too; fmtune trains on the last one and keeps the earlier ones as context. To train on an earlier answer, "
                        "make it the last message of its own row.")
    if splits.preference_rows:
        audit["preference_rows"] = splits.preference_rows
        warnings.append(f"{splits.preference_rows} rows are preference pairs: fmtune trains supervised on each preferred_output; "
                        "non_preferred_output is not used (no preference optimisation is run).")
    audit["warnings"] = warnings
    return audit


class GenerationTask(CausalTask):
    """Generation with a causal LM: the completion is the answer, the loss is on its tokens."""

    supports = Supports(kind="generation", default_method="lora", fsdp=False)
    primary_metric = staticmethod(primary_metric)
    selection = "validation loss"

    def __init__(self) -> None:
        self.generations: dict[str, list[str]] = {}
        self.redacted: dict[str, int] = {}

    def load(self, ctx: Context) -> None:
        from fmtune.data import pairs

        with stage("load and split data", ctx.profile):
            self.splits = pairs.load_pairs(ctx.cfg.data, ctx.seed)
            self.test_inputs = [p.prompt for p in self.splits.test]
            if ctx.cfg.data.redact_pii:
                self.splits, self.redacted = pairs.redact(self.splits)
        self.pairs = {s: getattr(self.splits, s) for s in ("train", "validation", "test")}

    def prepare(self, ctx: Context) -> Prepared:
        """Base model and audit; the pairs encoded at the chosen max_length; the first choices."""
        from fmtune.models import causal_lm

        cfg = ctx.cfg
        template_why = self.load_base(ctx)
        with stage("audit data", ctx.profile):
            audit, max_length_why = self._audit(ctx)
        self.enc = {s: [causal_lm.encode(self.tokenizer, p.chat(), p.completion, self.max_length) for p in ps] for s, ps in self.pairs.items()}
        truncated = {s: sum(e.truncated for e in rows) for s, rows in self.enc.items()}
        ctx.choose("max_length", self.max_length, f"{max_length_why} (prompt + completion in the chat template; over it the prompt loses its start, the completion keeps at least half)")
        ctx.choose("chat_template", True, template_why)
        ctx.choose("loss", "completion tokens only", "prompt and template tokens are masked (labels -100): the model learns the answers, not the questions")
        ctx.choose(*bf16_choice(cfg, self.bf16))
        ctx.choose("primary_metric", ctx.primary, "--metric" if cfg.eval.metric else f"default for generation ({DEFAULT_METRIC}: longest-common-subsequence F1 on normalised words)")
        self.max_new_tokens, new_tokens_why = choose_max_new_tokens(self.tokenizer, [p.completion for s in ("train", "validation") for p in self.pairs[s]],
                                                                     cfg.eval.max_new_tokens, self.limit)
        ctx.choose("max_new_tokens", self.max_new_tokens, new_tokens_why)
        self.references = [p.completion for p in self.pairs["test"]]
        self.test_chats = [p.chat() for p in self.pairs["test"]]
        self.train_cfg = cfg.train
        return Prepared(
            splits=self.splits, counts={s: len(p) for s, p in self.pairs.items()}, audit=audit, base=self.base, model_path=self.model_path, model_name=self.model_name,
            max_length=self.max_length, strata=np.zeros(len(self.enc["train"]), dtype=np.int64),
            task_block={"max_new_tokens": self.max_new_tokens, "decoding": "greedy"}, truncated=truncated, train_cfg=cfg.train,
        )

    def _audit(self, ctx: Context) -> tuple[dict, str]:
        """Token lengths of whole pairs, the model's limit, max_length and the audit; returns why that max_length."""
        from fmtune.data import audit as audit_mod
        from fmtune.data import pairs
        from fmtune.models import causal_lm
        from fmtune.models.loading import model_token_limit

        full = {s: [causal_lm.encode(self.tokenizer, p.chat(), p.completion) for p in ps] for s, ps in self.pairs.items()}
        lengths = {s: [len(e.input_ids) for e in enc] for s, enc in full.items()}
        self.limit = model_token_limit(self.base.config, self.tokenizer)
        self.max_length, max_length_why = choose_max_length(lengths["train"], self.limit, ctx.cfg.model.max_length)
        audit = audit_mod.audit(self.splits.for_audit(), token_lengths=lengths, max_length=self.max_length, redacted=self.redacted, model_limit=self.limit, classes=False)
        return generation_audit(audit, self.splits, pairs.prompt_overlap(self.splits)), max_length_why

    def no_training_rungs(self, ctx: Context) -> dict[str, Callable[[], Rung]]:
        """zero_shot and few_shot: the base model prompted; the few-shot prompts are kept for the break-even."""
        from fmtune.models import causal_lm

        cfg = ctx.cfg
        shots, shots_why = choose_shots(self.tokenizer, self.pairs["train"], self.pairs["test"], cfg.eval.few_shot_k, self.limit - self.max_new_tokens, ctx.seed)
        self.shot_chats = [few_shot_conversation(shots, c) for c in self.test_chats]

        def zero_shot() -> Rung:
            scored = self._generate_and_score(ctx, "zero_shot", self.base, self.test_chats, self.enc["test"])
            return Rung("zero_shot", "the base model answers the prompt alone (chat template, greedy decoding)", scored, 0)

        def few_shot() -> Rung:
            shot_scored = [causal_lm.encode(self.tokenizer, c, p.completion) for c, p in zip(self.shot_chats, self.pairs["test"])]
            scored = self._generate_and_score(ctx, "few_shot", self.base, self.shot_chats, shot_scored)
            ctx.choose("few_shot_k", len(shots), shots_why)
            return Rung("few_shot", f"the base model with {len(shots)} training pairs as previous chat turns in every prompt", scored, len(shots))

        return {name: fn for name, fn in (("zero_shot", zero_shot), ("few_shot", few_shot)) if name in cfg.eval.rungs}

    def _generate_and_score(self, ctx: Context, rung: str, model, conversations: list[list[dict]], scored_rows: list | None) -> Scored:
        """Greedy answers to the conversations scored against the references (and the completions' loss when
        `scored_rows` is given); the answers are kept for logs/generations.jsonl."""
        from fmtune.evidence.gen_metrics import generation_metrics
        from fmtune.models import causal_lm

        new_tokens, bs = self.max_new_tokens, ctx.cfg.eval.eval_batch_size
        with progress_bar() as prog:
            task = prog.add_task(f"{rung}: generating", total=len(conversations), info="")
            t0 = time.perf_counter()
            preds = causal_lm.generate(model, self.tokenizer, conversations, new_tokens, bs, self.bf16, self.limit - new_tokens, lambda n: prog.advance(task, n))
            gen_s = time.perf_counter() - t0
        nll = causal_lm.completion_nll(model, scored_rows, self.pad_id, bs, self.bf16) if scored_rows is not None else None
        m = generation_metrics(preds, self.references, nll, ctx.boot, ctx.primary)
        if scored_rows is None:  # a learning-curve point: its score only
            return Scored(m, m.pop("_boot_primary"))
        self.generations[rung] = preds
        return Scored(m, m.pop("_boot_primary"), {"eval_seconds": round(gen_s, 3)})

    def score_outputs(self, ctx: Context, outputs: list[str]) -> Scored:
        """Another model's answers to the test prompts, scored like the rungs' (no loss: its probabilities are not known)."""
        from fmtune.evidence.gen_metrics import generation_metrics

        m = generation_metrics(outputs, self.references, None, ctx.boot, ctx.primary)
        return Scored(m, m.pop("_boot_primary"))

    def fit(self, ctx: Context, label: str, subset: np.ndarray | None, from_scratch: bool, lr: float, lora: bool, checkpoint_dir: Path | None):
        idx = np.arange(len(self.enc["train"])) if subset is None else subset
        return self.fit_rows(ctx, label, [self.enc["train"][i] for i in idx], self.enc["validation"], lr=lr, lora=lora, from_scratch=from_scratch,
                             checkpoint_dir=checkpoint_dir), len(idx)

    def score(self, ctx: Context, rung: str, model) -> Scored:
        return self._generate_and_score(ctx, rung, model, self.test_chats, None if rung.startswith("curve") else self.enc["test"])

    def describe(self, rung: str, result, method: str, lr: float) -> str:
        t = self.train_cfg
        if rung == "fine_tuned":
            how = f"LoRA (r={t.lora_r}, merged)" if method == "lora" else "full"
            return f"{how} fine-tuning of the base model on all training pairs, loss on the completions, best validation-loss epoch ({result.best_epoch} of {result.epochs_run})"
        return f"{scratch_words(result)}, early stopping, lr {lr:g}"

    def probes(self, ctx: Context, tuned) -> tuple[dict, dict]:
        return self.perplexity_probes(ctx, tuned, [f"{p.prompt}\n{p.completion}" for p in self.pairs["train"]])

    def save(self, ctx: Context, tuned, model_dir: Path) -> None:
        super().save(ctx, tuned, model_dir)
        (ctx.tmp / "logs" / "generations.jsonl").write_text("".join(
            json.dumps({"row": p.row, "prompt": p.prompt, "reference": p.completion, **{g: self.generations[g][i] for g in self.generations}}, ensure_ascii=False) + "\n"
            for i, p in enumerate(self.pairs["test"])
        ))

    def measure(self, ctx: Context, tuned, model_dir: Path, lora: bool) -> dict:
        """Size, latency and per-request seconds: the few-shot prompt against the tuned model's bare prompt."""
        from fmtune.models import causal_lm

        new_tokens = self.max_new_tokens
        inf = self.size_and_latency(ctx, tuned, model_dir, self.test_chats, self.max_length, lora)
        k = max(1, min(LATENCY_REQUESTS, ctx.cfg.evidence.latency_repeats, len(self.test_chats)))
        inf["per_request"] = {
            "few_shot": causal_lm.request_seconds(self.base, self.tokenizer, self.shot_chats[:k], new_tokens, self.bf16),
            "fine_tuned": causal_lm.request_seconds(tuned, self.tokenizer, self.test_chats[:k], new_tokens, self.bf16),
        }
        return inf
