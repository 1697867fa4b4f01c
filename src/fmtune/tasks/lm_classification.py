"""Classification with a causal LM: text/label data, each text a chat whose answer is its label word (LoRA by default),
constrained scoring over the label set (fmtune.models.lm_classify); the classification metrics and the causal-LM evidence."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from fmtune.console import progress_bar, stage
from fmtune.errors import ConfigError
from fmtune.tasks.base import Context, Prepared, Rung, Scored, Supports, scored_label_outputs, scratch_words
from fmtune.tasks.causal import LATENCY_REQUESTS, CausalTask, bf16_choice
from fmtune.tasks.choices import choose_max_length, classification_primary

HEAD_ONLY_SKIPPED = ("not run for a causal LM: head_only is a linear head on a frozen encoder's embeddings; here the no-training rungs are the "
                     "same model prompted (zero_shot, few_shot), and the report contract makes head_only optional")


class LMClassification(CausalTask):
    """The label word as the chat answer, loss on its tokens, every prediction one of the labels."""

    supports = Supports(kind="classification", default_method="lora", fsdp=False)
    primary_metric = staticmethod(classification_primary)
    selection = "validation loss (label tokens)"

    def __init__(self) -> None:
        self.predictions: dict[str, np.ndarray] = {}
        self.redacted: dict[str, int] = {}
        self.shots: list = []

    @property
    def labels(self) -> list[str]:
        return self.splits.labels

    def load(self, ctx: Context) -> None:
        from fmtune.data import audit as audit_mod
        from fmtune.data import labeled

        cfg = ctx.cfg
        with stage("load and split data", ctx.profile):
            self.splits = labeled.load_splits(cfg.data, cfg.seed)
            self.test_inputs = [e.text for e in self.splits.test]
            if cfg.data.redact_pii:
                self.splits, self.redacted = audit_mod.redact_splits(self.splits)
            unknown = sorted(set(cfg.data.label_descriptions) - set(self.splits.labels))
            if unknown:
                raise ConfigError(f"--label-descriptions names label(s) {unknown} that the data does not have; labels are {self.splits.labels}.")

    def prepare(self, ctx: Context) -> Prepared:
        """Base model and audit; the texts cut to the chosen max_length; the prompt, class weights, the training rows."""
        from fmtune.models import lm_classify
        from fmtune.training import train

        cfg, labels = ctx.cfg, self.labels
        template_why = self.load_base(ctx)
        texts = {s: [e.text for e in getattr(self.splits, s)] for s in ("train", "validation", "test")}
        label_index = {lab: i for i, lab in enumerate(labels)}
        self.y = {s: np.array([label_index[e.label] for e in getattr(self.splits, s)], dtype=np.int64) for s in texts}
        with stage("audit data", ctx.profile):
            audit, overhead, max_length_why = self._audit(ctx, texts)
        self.prompt = lm_classify.LabelPrompt(tuple(labels), dict(cfg.data.label_descriptions), self.max_length)
        cut = {s: [lm_classify.cut(self.tokenizer, t, self.max_length) for t in ts] for s, ts in texts.items()}
        truncated = {s: sum(c for _, c in rows) for s, rows in cut.items()}
        self.texts = {s: [t for t, _ in rows] for s, rows in cut.items()}
        self.class_weight, cw_why = train.class_weight_vector(self.y["train"], len(labels), cfg.train.class_weights)
        self._first_choices(ctx, overhead, max_length_why, template_why, cw_why)
        weights = None if self.class_weight is None else self.class_weight[self.y["train"]]
        self.rows = {"train": lm_classify.training_rows(self.tokenizer, self.prompt, self.texts["train"], [labels[i] for i in self.y["train"]], weights),
                     "validation": lm_classify.training_rows(self.tokenizer, self.prompt, self.texts["validation"], [labels[i] for i in self.y["validation"]])}
        self.train_cfg = cfg.train
        return Prepared(
            splits=self.splits, counts={s: len(v) for s, v in self.y.items()}, audit=audit, base=self.base, model_path=self.model_path, model_name=self.model_name,
            max_length=self.max_length, strata=self.y["train"], task_block={"labels": labels, "model_kind": "causal_lm", "prompt": self.prompt.to_dict()},
            truncated=truncated, train_cfg=cfg.train,
        )

    def _first_choices(self, ctx: Context, overhead: int, max_length_why: str, template_why: str, cw_why: str) -> None:
        from fmtune.models import lm_classify

        ctx.choose("max_length", self.max_length, f"{max_length_why} (tokens of the text alone; the instruction, label list and chat template add up to {overhead}; a longer text keeps its start)")
        ctx.choose("formulation", "label word as the chat answer", f"a causal LM classifies by answering: the user turn names the task and lists the labels as they appear in the data ({self.prompt.instruction()!r}), then the text; the answer is the label word")
        ctx.choose("scoring", "constrained", f"{lm_classify.SCORING}; no free generation, so every prediction is one of the labels")
        ctx.choose("chat_template", True, template_why)
        ctx.choose("loss", "label tokens only", "prompt and template tokens are masked (labels -100): the model learns to answer with the label")
        ctx.choose("class_weights", None if self.class_weight is None else [round(float(w), 4) for w in self.class_weight],
                   cw_why + ("; each training example's loss is weighted by its class's weight" if self.class_weight is not None else ""))
        ctx.choose(*bf16_choice(ctx.cfg, self.bf16))

    def _audit(self, ctx: Context, texts: dict) -> tuple[dict, int, str]:
        """Token lengths of the texts, the tokens the prompt takes, max_length and the audit: (audit, that overhead, why that max_length)."""
        from fmtune.data import audit as audit_mod
        from fmtune.models import causal_lm, lm_classify
        from fmtune.models.loading import model_token_limit

        tokenizer, labels = self.tokenizer, self.labels
        lengths = {s: [len(ids) for ids in tokenizer(t, add_special_tokens=False)["input_ids"]] if t else [] for s, t in texts.items()}
        limit = self.limit = model_token_limit(self.base.config, tokenizer)
        bare = lm_classify.LabelPrompt(tuple(labels), dict(ctx.cfg.data.label_descriptions))
        overhead = max(len(causal_lm.encode(tokenizer, bare.messages(""), lab).input_ids) for lab in labels)
        if limit - overhead < 8:
            raise ConfigError(f"the instruction, the {len(labels)} labels and the chat template take {overhead} of the model's {limit} tokens, leaving no room "
                              "for the text. Fix: shorter --label-descriptions, or a model with a longer context.")
        self.max_length, max_length_why = choose_max_length(lengths["train"], limit - overhead, ctx.cfg.model.max_length)
        audit = audit_mod.audit(self.splits, token_lengths=lengths, max_length=self.max_length, redacted=self.redacted, model_limit=limit - overhead)
        return audit, overhead, max_length_why

    def no_training_rungs(self, ctx: Context) -> dict[str, Callable[[], Rung]]:
        """zero_shot and few_shot: the base model prompted, calibrated on validation when that helps (shots kept for the break-even)."""
        from fmtune.models import lm_classify

        cfg, texts = ctx.cfg, self.texts
        self.shots, per_class, shots_why = lm_classify.choose_shots(self.tokenizer, self.prompt, texts["train"], self.y["train"], texts["test"] + texts["validation"],
                                                                    cfg.eval.few_shot_k, self.limit, ctx.seed)

        def zero_shot() -> Rung:
            desc = "the base model, no labeled examples: the instruction and the label list, constrained scoring of the labels"
            scored, desc = self._label_scores(ctx, "zero_shot", desc, self.base, [], calibrated=True)
            return Rung("zero_shot", desc, scored, 0)

        def few_shot() -> Rung:
            desc = f"the base model with {per_class} labeled examples per class ({len(self.shots)} in all) as previous chat turns in every prompt, constrained scoring"
            scored, desc = self._label_scores(ctx, "few_shot", desc, self.base, self.shots, calibrated=True)
            scored.extra["shots_per_class"] = per_class
            ctx.choose("few_shot_k", per_class, shots_why)
            return Rung("few_shot", desc, scored, len(self.shots))

        return {name: fn for name, fn in (("zero_shot", zero_shot), ("few_shot", few_shot)) if name in cfg.eval.rungs}

    def skipped_rungs(self, cfg) -> dict[str, str]:
        return {"head_only": HEAD_ONLY_SKIPPED} if "head_only" in cfg.eval.rungs else {}

    def _label_scores(self, ctx: Context, rung: str, description: str, model, shots: list, calibrated: bool = False) -> tuple[Scored, str]:
        """The test split scored; with `calibrated` (the no-training rungs) the content-free texts and the validation split
        first, to choose raw or calibrated scores on validation (lm_classify.fit_calibration)."""
        from fmtune.evidence.evaluate import classification_metrics
        from fmtune.models import lm_classify

        bs, texts, y = ctx.cfg.eval.eval_batch_size, self.texts, self.y
        calibration, extra = None, {}
        with progress_bar() as prog:
            if calibrated:
                task = prog.add_task(f"{rung}: content-free and validation texts (calibration)", total=len(lm_classify.CONTENT_FREE) + len(texts["validation"]), info="")
                t0 = time.perf_counter()
                calibration = lm_classify.fit_calibration(model, self.tokenizer, self.prompt, shots, texts["validation"], y["validation"], bs, self.bf16, lambda n: prog.advance(task, n))
                extra["calibration"] = {**calibration.to_dict(self.labels), "seconds": round(time.perf_counter() - t0, 3)}
                ctx.choose(f"calibration_{rung}", "calibrated" if calibration.applied else "raw", calibration.why)
                if calibration.applied:
                    description += "; contextually calibrated (each label's log-probability minus its mean after content-free texts, chosen on validation)"
            task = prog.add_task(f"{rung}: scoring the labels", total=len(texts["test"]), info="")
            t0 = time.perf_counter()
            scores = lm_classify.label_scores(model, self.tokenizer, self.prompt, texts["test"], shots, bs, self.bf16, lambda n: prog.advance(task, n))
            extra["eval_seconds"] = round(time.perf_counter() - t0, 3)
        if calibration is not None:
            scores = calibration.apply(scores)
        predictions = scores.argmax(1)
        m = classification_metrics(y["test"], predictions, self.labels, ctx.boot, ctx.primary)
        if not rung.startswith("curve"):
            self.predictions[rung] = predictions
        return Scored(m, m.pop("_boot_primary"), extra), description

    def score_outputs(self, ctx: Context, outputs: list[str]) -> Scored:
        return scored_label_outputs(ctx, outputs, self.labels, self.y["test"])

    def fit(self, ctx: Context, label: str, subset: np.ndarray | None, from_scratch: bool, lr: float, lora: bool, checkpoint_dir: Path | None):
        idx = np.arange(len(self.rows["train"])) if subset is None else subset
        return self.fit_rows(ctx, label, [self.rows["train"][i] for i in idx], self.rows["validation"], lr=lr, lora=lora, from_scratch=from_scratch,
                             checkpoint_dir=checkpoint_dir), len(idx)

    def score(self, ctx: Context, rung: str, model) -> Scored:
        scored, _ = self._label_scores(ctx, rung, "", model, [])
        if rung.startswith("curve"):
            scored.extra = {}
        return scored

    def describe(self, rung: str, result, method: str, lr: float) -> str:
        t = self.train_cfg
        if rung == "fine_tuned":
            how = f"LoRA (r={t.lora_r}, merged)" if method == "lora" else "full"
            return (f"{how} fine-tuning of the base model to answer with the label word, loss on the label tokens, best validation-loss epoch "
                    f"({result.best_epoch} of {result.epochs_run}); zero-shot prompt, constrained scoring")
        return f"{scratch_words(result)}, early stopping, lr {lr:g}; constrained scoring"

    def probes(self, ctx: Context, tuned) -> tuple[dict, dict]:
        return self.perplexity_probes(ctx, tuned, self.texts["train"])

    def save(self, ctx: Context, tuned, model_dir: Path) -> None:
        """The merged model and how to prompt and score it; the predictions log."""
        super().save(ctx, tuned, model_dir)
        self.prompt.save(model_dir)
        labels = self.labels
        (ctx.tmp / "logs" / "predictions.jsonl").write_text("".join(
            json.dumps({"row": e.row, "text": e.text, "label": e.label, **{p: labels[self.predictions[p][i]] for p in self.predictions}}, ensure_ascii=False) + "\n"
            for i, e in enumerate(self.splits.test)
        ))

    def measure(self, ctx: Context, tuned, model_dir: Path, lora: bool) -> dict:
        from fmtune.models import lm_classify

        texts = self.texts
        test_chats = [self.prompt.messages(t) for t in texts["test"]]
        inf = self.size_and_latency(ctx, tuned, model_dir, test_chats, self.limit, lora)
        k = max(1, min(LATENCY_REQUESTS, ctx.cfg.evidence.latency_repeats, len(test_chats)))
        inf["per_request"] = {
            "few_shot": lm_classify.request_seconds(self.base, self.tokenizer, self.prompt, texts["test"][:k], self.shots, self.bf16),
            "fine_tuned": lm_classify.request_seconds(tuned, self.tokenizer, self.prompt, texts["test"][:k], [], self.bf16),
        }
        return inf
