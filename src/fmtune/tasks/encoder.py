"""Encoder classification: text/label data, a pre-trained encoder (MiniLM by default) with a new classifier head;
zero_shot, few_shot and head_only on its frozen embeddings; retention and domain shift on embeddings of general text."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fmtune.config import RunConfig, TrainConfig
from fmtune.console import progress_bar, stage
from fmtune.errors import ConfigError
from fmtune.tasks.base import Context, Prepared, Rung, Scored, Supports, scored_label_outputs, scratch_words
from fmtune.tasks.choices import choose_max_length, classification_primary

MIN_TRAIN_STEPS = 300  # a small training set gets enough epochs for about this many optimizer steps (see max_epochs)
MAX_DERIVED_EPOCHS = 30
HEAD_LR_FACTOR = 30  # the new classifier head's learning rate over the encoder's (see head_learning_rate_why)
SCRATCH_EXTRA_PATIENCE = 2  # from_scratch rung: extra early-stopping patience (see _rung_settings)
SCRATCH_WARMUP = 0.2  # from_scratch rung: at least this share of its steps warms the learning rate up (see _rung_settings)


def max_epochs(n_train: int, train) -> tuple[int, str]:
    """The epoch limit, raised for small training sets when --epochs was not given: a fresh classifier head on
    a few hundred texts needs a few hundred steps at the default learning rate, more than 8 epochs give it (19 classes,
    489 texts: macro-F1 0.336 after 8 epochs, 0.467 with early stopping at epoch 18). Early stopping still ends sooner."""
    default = TrainConfig.model_fields["epochs"].default
    steps = math.ceil(n_train / train.batch_size)
    if "epochs" in train.model_fields_set:  # given (--epochs or YAML), even when it equals the default
        return train.epochs, f"--epochs ({train.epochs} epochs of {steps} steps; early stopping may end sooner)"
    if steps * default >= MIN_TRAIN_STEPS:
        return default, f"default ({default} epochs of {steps} steps; early stopping may end sooner)"
    raised = min(MAX_DERIVED_EPOCHS, math.ceil(MIN_TRAIN_STEPS / steps))
    return raised, (f"raised from the default {default}: {n_train} training texts make {steps} steps an epoch, and about {MIN_TRAIN_STEPS} steps "
                    f"let a new classifier head settle at the default learning rate; early stopping may end sooner (set --epochs to override)")


def meaningless_label_names(labels: list[str], descriptions: dict[str, str]) -> list[str]:
    """zero_shot compares texts with the label names: a warning when they are bare numbers with no description."""
    bare = [label for label in labels if label.lstrip("-").isdigit() and label not in descriptions]
    if not bare:
        return []
    example = ";".join(f"{label}=<what {label} means>" for label in bare[:2])
    return [f"Labels {', '.join(repr(label) for label in bare[:5])}{' ...' if len(bare) > 5 else ''} are bare numbers: the zero_shot rung compares each "
            f"text with the label name itself, which carries no meaning, so its score is close to chance; pass --label-descriptions "
            f"'{example}' to give zero_shot words to compare with."]


def head_learning_rate_why(train) -> str:
    if train.head_learning_rate:
        return "--head-learning-rate"
    return (f"default: {HEAD_LR_FACTOR}x the learning rate, for the parameters the base model does not have (the new classifier head): "
            f"a randomly initialised head at the encoder's rate learns too slowly, above all with many classes "
            f"(benchmarks/head_lr_sets.py, test macro-F1 over 3 seeds: +0.13 with 20 classes, +0.08 with 19, +0.04 with 9, +0.003 with 2). "
            f"Set --head-learning-rate to override")


def head_learning_rate(train, lora: bool, learning_rate: float) -> float | None:
    """The new head's rate for a fine-tune at `learning_rate`: --head-learning-rate, or HEAD_LR_FACTOR x the rate. LoRA
    trains the head at the LoRA rate: no head rate, so fit keeps one rate (from_scratch has no head)."""
    return None if lora else train.head_learning_rate or learning_rate * HEAD_LR_FACTOR


class EncoderClassification:
    """Classification with a pre-trained encoder and a new classifier head."""

    supports = Supports(kind="classification", default_method="full", new_head=True, no_training_rungs=("zero_shot", "few_shot", "head_only"))
    primary_metric = staticmethod(classification_primary)
    model_kind = "encoder"

    def __init__(self) -> None:
        self.splits: Any = None
        self.redacted: dict[str, int] = {}
        self.texts: dict = {}
        self.y: dict = {}
        self.ids: dict = {}
        self.tokenised: dict = {}
        self.class_weight = None
        self.train_cfg = None
        self.embeddings: dict = {}

    @property
    def labels(self) -> list[str]:
        return self.splits.labels

    def load(self, ctx: Context) -> None:
        """Read and split the data and check the model folder and its tokenizer (before any run folder exists)."""
        from fmtune.data import audit as audit_mod
        from fmtune.data import labeled
        from fmtune.models import loading

        cfg = ctx.cfg
        with stage("load and split data", ctx.profile):
            self.splits = labeled.load_splits(cfg.data, cfg.seed)
            self.test_inputs = [e.text for e in self.splits.test]
            if cfg.data.redact_pii:
                self.splits, self.redacted = audit_mod.redact_splits(self.splits)
            unknown = sorted(set(cfg.data.label_descriptions) - set(self.splits.labels))
            if unknown:
                raise ConfigError(f"--label-descriptions names label(s) {unknown} that the data does not have; labels are {self.splits.labels}.")
        self.model_path = loading.resolve_model_path(cfg.model.model or "minilm")
        loading.check_safe_folder(self.model_path)
        self.tokenizer = loading.load_tokenizer(self.model_path)  # a broken tokenizer stops the run before any folder is created

    def prepare(self, ctx: Context) -> Prepared:
        """Tokenise, audit, and the choices derived from the data: max length, class weights, bf16, the epoch limit."""
        from fmtune.data import tokens
        from fmtune.models import loading
        from fmtune.training import train

        cfg, labels = ctx.cfg, self.labels
        self.encoder = loading.load_encoder(self.model_path).to(ctx.device)
        self.bf16 = {"on": True, "off": False}.get(cfg.train.bf16, loading.bf16_supported(ctx.device))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.texts = {s: [e.text for e in getattr(self.splits, s)] for s in ("train", "validation", "test")}
        label_index = {lab: i for i, lab in enumerate(labels)}
        self.y = {s: np.array([label_index[e.label] for e in getattr(self.splits, s)], dtype=np.int64) for s in self.texts}
        with stage("tokenise", ctx.profile):
            self.tokenised = {s: tokens.tokenise(self.tokenizer, t, use_cache=cfg.train.token_cache) for s, t in self.texts.items()}
        with stage("audit data", ctx.profile):
            audit, max_length_why = self._audit(ctx)
        ctx.choose("max_length", self.max_length, max_length_why)
        self.class_weight, cw_why = train.class_weight_vector(self.y["train"], len(labels), cfg.train.class_weights)
        ctx.choose("class_weights", None if self.class_weight is None else [round(float(w), 4) for w in self.class_weight], cw_why)
        bf16_why = " (hardware supports bf16)" if self.bf16 and cfg.train.bf16 == "auto" else " (no bf16 support detected)" if cfg.train.bf16 == "auto" else ""
        ctx.choose("bf16", self.bf16, f"--bf16 {cfg.train.bf16}{bf16_why}")
        epochs, epochs_why = max_epochs(len(self.y["train"]), cfg.train)
        self.train_cfg = cfg.train.model_copy(update={"epochs": epochs})  # the limit trained with; cfg stays as given (config.yaml, manifest)
        ctx.choose("max_epochs", epochs, epochs_why)
        self.ids = {s: tokens.truncate(self.tokenizer, t, self.tokenised[s].ids, self.max_length) for s, t in self.texts.items()}  # what every model sees
        return Prepared(
            splits=self.splits, counts={s: len(v) for s, v in self.y.items()}, audit=audit, base=self.encoder, model_path=self.model_path,
            model_name=cfg.model.model or "minilm", max_length=self.max_length, strata=self.y["train"], task_block={"labels": labels}, train_cfg=self.train_cfg,
        )

    def _audit(self, ctx: Context) -> tuple[dict, str]:
        from fmtune.data import audit as audit_mod
        from fmtune.models import loading

        cfg = ctx.cfg
        lengths = {s: t.lengths for s, t in self.tokenised.items()}
        self.limit = loading.model_token_limit(self.encoder.config, self.tokenizer)
        self.max_length, max_length_why = choose_max_length(lengths["train"], self.limit, cfg.model.max_length)
        audit = audit_mod.audit(self.splits, token_lengths=lengths, max_length=self.max_length, redacted=self.redacted, model_limit=self.limit)
        if "zero_shot" in cfg.eval.rungs:
            audit["warnings"] += meaningless_label_names(self.labels, cfg.data.label_descriptions)
        special = set(self.tokenizer.all_special_ids) - {self.tokenizer.unk_token_id}
        audit["vocabulary"], vocabulary_warnings = audit_mod.vocabulary_coverage(self.texts["train"], self.tokenised["train"].ids, self.tokenizer.unk_token_id, special)
        audit["warnings"] += vocabulary_warnings
        return audit, max_length_why

    def no_training_rungs(self, ctx: Context) -> dict[str, Callable[[], Rung]]:
        """zero_shot, few_shot, head_only on the base encoder's frozen embeddings (embedded once, in its own stage)."""
        from fmtune.evidence import baselines

        wanted = [name for name in baselines.BASELINES if name in ctx.cfg.eval.rungs]
        if not wanted:
            return {}
        embedded = self._embed(ctx)

        def rung(name: str) -> Rung:
            res = baselines.BASELINES[name](embedded)
            return Rung(name, res.description, self._scored(ctx, res.predictions), res.train_examples, res.train_seconds)

        return {name: (lambda name=name: rung(name)) for name in wanted}

    def _embed(self, ctx: Context):
        from fmtune.evidence import baselines
        from fmtune.evidence.evaluate import embed

        cfg, bs = ctx.cfg, ctx.cfg.eval.eval_batch_size
        with stage("embed texts with the base model", ctx.profile), progress_bar() as prog:
            total = sum(len(t) for t in self.texts.values())
            task = prog.add_task("embedding", total=total, info="")
            t0 = time.perf_counter()
            emb = {s: embed(self.encoder, self.tokenizer, t, self.max_length, bs, self.bf16, lambda n: prog.advance(task, n), self.ids[s]) for s, t in self.texts.items()}
            per_text = (time.perf_counter() - t0) / max(total, 1)
            label_texts = [cfg.data.label_descriptions.get(lab, lab.replace("_", " ")) for lab in self.labels]
            label_emb = embed(self.encoder, self.tokenizer, label_texts, self.max_length, bs, self.bf16)
        self.embeddings = emb
        return baselines.Embedded(emb["train"], emb["validation"], emb["test"], self.y["train"], self.y["validation"], self.labels, label_texts, label_emb,
                                  per_text, cfg.seed, cfg.eval.few_shot_k)

    def _scored(self, ctx: Context, predictions, **extra) -> Scored:
        from fmtune.evidence.evaluate import classification_metrics

        m = classification_metrics(self.y["test"], np.asarray(predictions), self.labels, ctx.boot, ctx.primary)
        return Scored(m, m.pop("_boot_primary"), extra)

    def score_outputs(self, ctx: Context, outputs: list[str]) -> Scored:
        return scored_label_outputs(ctx, outputs, self.labels, self.y["test"])

    def fit(self, ctx: Context, label: str, subset: np.ndarray | None, from_scratch: bool, lr: float, lora: bool, checkpoint_dir: Path | None):
        """A fresh classifier on the base encoder (or its architecture, randomly initialised), trained on the training
        texts (all, or `subset`): (TrainResult, training examples)."""
        from fmtune.training import train

        model, head = self._classifier(ctx, from_scratch)
        idx = np.arange(len(self.y["train"])) if subset is None else subset
        rung_cfg = self._rung_settings(ctx, from_scratch)
        with progress_bar() as prog:
            task = prog.add_task(label, total=len(idx) * rung_cfg.epochs, info="")
            result = train.fit(model, self.tokenizer, ([self.ids["train"][i] for i in idx], self.y["train"][idx]), (self.ids["validation"], self.y["validation"]), rung_cfg,
                               learning_rate=lr, n_classes=len(self.labels), seed=ctx.seed, bf16=self.bf16, lora=lora, class_weight=self.class_weight,
                               eval_batch_size=ctx.cfg.eval.eval_batch_size, progress=_epoch_progress(ctx, prog, task, label), checkpoint_dir=checkpoint_dir, world=ctx.world,
                               head=head, head_learning_rate=None if from_scratch else head_learning_rate(self.train_cfg, lora, lr))
        return result, len(idx)

    def _classifier(self, ctx: Context, from_scratch: bool):
        import torch

        from fmtune.models import loading

        torch.manual_seed(ctx.seed)
        model, head = loading.load_classifier_and_head(self.model_path, self.labels, from_scratch=from_scratch, dropout=self.train_cfg.dropout)
        return model.to(ctx.device), head

    def _rung_settings(self, ctx: Context, from_scratch: bool):
        # a randomly initialised encoder often sits at chance level for its first epochs before it starts to learn
        # (MiniLM on the quickstart: 2 epochs at loss 0.69, then 0.49 in the third); SCRATCH_EXTRA_PATIENCE more
        # epochs of patience keep early stopping from ending it on that plateau, within the same max-epochs budget;
        # SCRATCH_WARMUP of the steps warm up its learning rate (with the fine-tune's 6% the quickstart's random
        # MiniLM sat at the majority class for all 5 epochs it was given, test macro-F1 0.366; with 20%, 0.671)
        t = ctx.train_settings(self.train_cfg, from_scratch)
        return t.model_copy(update={"patience": t.patience + SCRATCH_EXTRA_PATIENCE, "warmup_ratio": max(t.warmup_ratio, SCRATCH_WARMUP)}) if from_scratch else t

    def restore(self, ctx: Context, weights: dict | None, from_scratch: bool):
        model, _ = self._classifier(ctx, from_scratch)
        if weights is not None:
            model.load_state_dict(weights)
        return model.eval()

    def score(self, ctx: Context, rung: str, model) -> Scored:
        from fmtune.training import train

        t0 = time.perf_counter()
        _, pred = train.evaluate_split(model, self.ids["test"], self.y["test"], self.pad_id, ctx.cfg.eval.eval_batch_size, self.bf16)
        return self._scored(ctx, pred, eval_seconds=round(time.perf_counter() - t0, 3))

    def describe(self, rung: str, result, method: str, lr: float) -> str:
        t = self.train_cfg
        if rung == "fine_tuned":
            how = f"LoRA (r={t.lora_r}, merged)" if method == "lora" else "full"
            return f"{how} fine-tuning of the base FM on all training data, best validation epoch ({result.best_epoch} of {result.epochs_run})"
        return (f"{scratch_words(result)}, early stopping with patience {t.patience + SCRATCH_EXTRA_PATIENCE} (a random model often needs "
                f"a few epochs to leave chance level), lr {lr:g} warmed up over {max(t.warmup_ratio, SCRATCH_WARMUP):.0%} of the steps")

    selection = "validation macro-F1"  # what picked the best epoch (TrainResult.selection says which rule ran)

    def epoch_score(self, row: dict) -> float:
        """The score early stopping selects on (training.train.selection_rule): macro-F1, or minus the validation loss."""
        from fmtune.training import train

        rule, _ = train.selection_rule(self.y["validation"], len(self.labels))
        return {"metric": row["val_macro_f1"], "calibrated": -row.get("val_calibrated_loss", row["val_loss"])}.get(rule, -row["val_loss"])

    def min_epochs(self, n_train: int) -> int:
        from fmtune.training import train

        return train.min_epochs(n_train, self.train_cfg.batch_size, self.train_cfg.epochs)

    def probes(self, ctx: Context, tuned) -> tuple[dict, dict]:
        """Retention of general knowledge (base vs tuned on general sentences) and the task data's domain shift."""
        from fmtune.data import tokens
        from fmtune.evidence import domain_shift, retention
        from fmtune.evidence.evaluate import embed

        cfg, bs, limit, max_length = ctx.cfg, ctx.cfg.eval.eval_batch_size, self.limit, self.max_length
        docs, source = retention.general_documents(cfg.evidence.general_text)
        sents, owners = retention.sentences_by_document(docs)
        # whole sentences up to the model's limit, not the run's max_length: the same probe for every run on this model
        sent_ids = self.tokenizer(sents, truncation=True, max_length=limit, add_special_tokens=True)["input_ids"]  # once for both models
        gen_base = embed(self.encoder, self.tokenizer, sents, limit, bs, self.bf16, ids=sent_ids)
        gen_tuned = embed(tuned, self.tokenizer, sents, limit, bs, self.bf16, ids=sent_ids)
        retention_ = retention.retention(gen_base, gen_tuned, owners, source, cfg.evidence.max_forgetting)
        retention_["details"]["max_tokens"] = limit
        # the shift classifier compares like with like: general sentences cut where the task's texts were cut
        cut = any(len(ids) > max_length for ids in sent_ids)
        shift_base = embed(self.encoder, self.tokenizer, sents, max_length, bs, self.bf16, ids=tokens.truncate(self.tokenizer, sents, sent_ids, max_length)) if cut else gen_base
        train_emb = self.embeddings.get("train")
        if train_emb is None:  # no no-training rung embedded the texts
            train_emb = embed(self.encoder, self.tokenizer, self.texts["train"], max_length, bs, self.bf16, ids=self.ids["train"])
        shift = domain_shift.domain_shift(train_emb, shift_base, cfg.seed)
        shift["details"]["general_source"] = source
        return retention_, shift

    def save(self, ctx: Context, tuned, model_dir: Path) -> None:
        tuned.save_pretrained(model_dir, safe_serialization=True)
        self.tokenizer.save_pretrained(model_dir)

    def measure(self, ctx: Context, tuned, model_dir: Path, lora: bool) -> dict:
        """Size and latency of the base and the tuned model on the same inputs."""
        from fmtune.evidence import inference

        test = self.texts["test"]
        order = np.argsort([len(t) for t in test])
        sample = [test[i] for i in order[len(order) // 2 :]][:64] or test[:1]
        reps = ctx.cfg.evidence.latency_repeats
        return {
            "base": inference.describe(self.encoder, self.model_path, inference.latency(self.encoder, self.tokenizer, sample, self.max_length, self.bf16, reps)),
            "fine_tuned": inference.describe(tuned, model_dir, inference.latency(tuned, self.tokenizer, sample, self.max_length, self.bf16, reps)),
            "note": "Same inputs (median-length test texts), same precision, same threads; the base is the encoder, the tuned model is the encoder plus its classification head"
            + (", with the LoRA adapters merged into the weights" if lora else "") + ".",
        }

    measures = "size and latency"

    def tuning_choices(self, ctx: Context, lora: bool, learning_rate: float) -> dict:
        """The new head's learning rate (full fine-tuning; LoRA trains the head at the LoRA rate): a choice and a row field."""
        rate = head_learning_rate(self.train_cfg, lora, learning_rate)
        if rate is not None:
            ctx.choose("head_learning_rate", rate, head_learning_rate_why(self.train_cfg))
        return {"head_learning_rate": rate}

    def skipped_rungs(self, cfg: RunConfig) -> None:
        return None

    def levers(self) -> dict:
        return {"token_cache": {s: t.source for s, t in self.tokenised.items()} if self.train_cfg.token_cache else "off",
                "tokenise_seconds": round(sum(t.seconds for t in self.tokenised.values()), 3)}


def _epoch_progress(ctx: Context, prog, task, label: str) -> Callable[[int, dict], None]:
    def progress(n: int, row: dict) -> None:
        prog.advance(task, n)
        if row:  # the line first: the runner's hook may end the trial here (the search's pruner)
            info = f"epoch {row['epoch']}: train loss {row['train_loss']:.4f}, val loss {row['val_loss']:.4f}, val macro-F1 {row['val_macro_f1']:.3f} ({row['seconds']:.0f} s)"
            prog.update(task, info=f"epoch {row['epoch']} val macro-F1 {row['val_macro_f1']:.3f}")
            prog.console.print(f"  {label} {info}")
            ctx.epoch_end(row)

    return progress
