"""One run, one folder: data -> audit -> baselines -> fine-tune / from scratch / learning curve -> evidence -> report.

Each stage is a plain function in its own module; this module only wires them, times them, shows progress and writes the
run folder atomically (everything goes to a temporary folder that is renamed when the run is complete).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from fmtune.version import __version__
from fmtune.config import RunConfig, to_yaml
from fmtune.errors import ConfigError, FmtuneError
# the runner's shared parts, named here too for the callers that import them from fmtune.pipeline
from fmtune.runner.console import GateFailed, console, print_summary, progress_bar, raise_if_gate_failed, stage  # noqa: F401
from fmtune.runner.folder import (  # noqa: F401
    check_replaceable, check_run_target, disk_io, marked_on_failure, open_run_dir, partial_dir, record, replace_folder, run_name,
)
from fmtune.runner.ladder import PRIMARY, choose_max_length, classification_primary, classification_rung  # noqa: F401
from fmtune.runner.report import finish

MIN_TRAIN_STEPS = 300  # a small training set gets enough epochs for about this many optimizer steps (see max_epochs)
MAX_DERIVED_EPOCHS = 30


def max_epochs(n_train: int, train) -> tuple[int, str]:
    """The epoch limit, raised for small training sets when --epochs was not given: a fresh classifier head on
    a few hundred texts needs a few hundred steps at the default learning rate, more than 8 epochs give it (19 classes,
    489 texts: macro-F1 0.336 after 8 epochs, 0.467 with early stopping at epoch 18). Early stopping still ends sooner."""
    from fmtune.config import TrainConfig

    default = TrainConfig.model_fields["epochs"].default
    steps = math.ceil(n_train / train.batch_size)
    if "epochs" in train.model_fields_set:  # given (--epochs or YAML), even when it equals the default
        return train.epochs, f"--epochs ({train.epochs} epochs of {steps} steps; early stopping may end sooner)"
    if steps * default >= MIN_TRAIN_STEPS:
        return default, f"default ({default} epochs of {steps} steps; early stopping may end sooner)"
    raised = min(MAX_DERIVED_EPOCHS, math.ceil(MIN_TRAIN_STEPS / steps))
    return raised, (f"raised from the default {default}: {n_train} training texts make {steps} steps an epoch, and about {MIN_TRAIN_STEPS} steps "
                    f"let a new classifier head settle at the default learning rate; early stopping may end sooner (set --epochs to override)")


def _still_improving(result, train) -> bool:
    """Whether training ran out of epochs while validation was still getting better (best epoch = the last allowed)."""
    return result.epochs_run >= train.epochs and result.best_epoch == result.epochs_run


def _undertrained_caveat(train) -> str:
    return (f"; validation was still improving at the last epoch, so the model is probably undertrained: "
            f"raise --epochs (now {train.epochs}) or --learning-rate (now {train.learning_rate:g})")


def _meaningless_label_names(labels: list[str], descriptions: dict[str, str]) -> list[str]:
    """zero_shot compares texts with the label names: a warning when they are bare numbers with no description."""
    bare = [label for label in labels if label.lstrip("-").isdigit() and label not in descriptions]
    if not bare:
        return []
    example = ";".join(f"{label}=<what {label} means>" for label in bare[:2])
    return [f"Labels {', '.join(repr(label) for label in bare[:5])}{' ...' if len(bare) > 5 else ''} are bare numbers: the zero_shot rung compares each "
            f"text with the label name itself, which carries no meaning, so its score is close to chance; pass --label-descriptions "
            f"'{example}' to give zero_shot words to compare with."]


def _learning_rate_why(train, lora: bool) -> str:
    from fmtune.config import TrainConfig

    default = TrainConfig.model_fields["learning_rate"].default
    given = "--learning-rate" if train.learning_rate != default else f"default ({default:g}, the usual peak rate for fine-tuning a pre-trained encoder; set --learning-rate)"
    if lora and train.lora_learning_rate:
        return "--lora-learning-rate"
    return f"LoRA: 10x the fine-tuning rate, {given}" if lora else given


def _head_learning_rate_why(train) -> str:
    if train.head_learning_rate:
        return "--head-learning-rate"
    return (f"default: {HEAD_LR_FACTOR}x the learning rate, for the parameters the base model does not have (the new classifier head): "
            f"a randomly initialised head at the encoder's rate learns too slowly, above all with many classes "
            f"(benchmarks/head_lr_sets.py, test macro-F1 over 3 seeds: +0.13 with 20 classes, +0.08 with 19, +0.04 with 9, +0.003 with 2). "
            f"Set --head-learning-rate to override")


HEAD_LR_FACTOR = 30  # the new classifier head's learning rate over the encoder's (see _head_learning_rate_why)
SCRATCH_EXTRA_PATIENCE = 2  # from_scratch rung: extra early-stopping patience (see train_rung)
SCRATCH_WARMUP = 0.2  # from_scratch rung: at least this share of its steps warms the learning rate up (see train_rung)


def _is_causal_lm(name: str | None) -> bool:
    from fmtune.causal_lm import is_causal_lm

    return is_causal_lm(name)


def _dispatch_checks(cfg: RunConfig, causal: bool, world) -> None:
    """What a causal-LM run cannot do, said before anything starts."""
    if causal and world.distributed:  # every rank would run the whole pipeline and write the same folder
        raise FmtuneError(
            "runs on a causal LM (generation, or classification with smollm2 or a *ForCausalLM folder) train in one process; "
            "multi-process training (--nproc, torchrun, accelerate launch) covers encoder classification. Fix: run the same command without --nproc / the launcher."
        )
    if cfg.train.head_learning_rate and (causal or cfg.train.method == "lora"):
        console.print("[yellow]note:[/] --head-learning-rate applies to full fine-tuning of an encoder classifier (its new head); this run "
                      + ("trains a causal LM, which answers with the label word and has no new head" if causal else "uses LoRA, whose head trains at the LoRA rate") + ", so it is not used.")
    if causal and not {"zero_shot", "few_shot"} & set(cfg.eval.rungs):
        raise ConfigError(f"--rungs {','.join(cfg.eval.rungs)}: a causal-LM run compares fine_tuned with the prompted base model, so include zero_shot or few_shot "
                          "(head_only, a linear head on a frozen encoder's embeddings, does not apply to a causal LM).")


def run(cfg: RunConfig, command: str = "fmtune run", show_summary: bool = True) -> Path:
    """Run the whole evidence pipeline; returns the finished run folder. `show_summary` prints the ladder, the audit
    warnings and the verdict on stdout at the end."""
    from transformers.utils import logging as hf_logging

    from fmtune import distributed, gen_data

    hf_logging.disable_progress_bar()  # fmtune shows its own progress
    generation = gen_data.detect_task(cfg.data) == "generation"
    _dispatch_checks(cfg, generation or _is_causal_lm(cfg.model.model), distributed.world())
    if generation:
        from fmtune.gen_pipeline import run_generation

        return run_generation(cfg, command, show_summary)
    if _is_causal_lm(cfg.model.model):  # classification with a causal LM: the label word as the answer
        from fmtune.gen_pipeline import run_lm_classification

        return run_lm_classification(cfg, command, show_summary)
    r = _start(cfg, command)
    with marked_on_failure(r.out, r.tmp, r.name, main=r.world.main):
        _prepare(r)
        emb = _no_training_rungs(r)
        ft = _trained_rungs(r)
        curve, curve_seconds = _learning_curve(r, ft)
        if not r.world.main:  # the other ranks only take part in training; rank 0 measures and writes the rest
            return r.out
        retention_, shift = _probes(r, ft.model, emb["train"])
        inf = _save_and_measure(r, ft.model)
        report = _report(r, ft, curve, curve_seconds, retention_, shift, inf)
        finish(report, cfg, r.tmp, r.out, r.wall_start, r.model_path, r.io_start)
    if show_summary:
        print_summary(report, r.out)
    raise_if_gate_failed(report, r.out)
    return r.out


@dataclass
class _Run:
    """What the stages of an encoder classification run share: set by _start and _prepare, then read (the ladder and
    its bootstrap draws grow as rungs finish)."""

    cfg: RunConfig
    command: str
    primary: str
    started: datetime
    wall_start: float
    io_start: dict | None
    log: list[str]
    splits: Any
    redacted: dict[str, int]
    model_path: Path
    tokenizer: Any
    device: Any
    world: Any
    out: Path
    tmp: Path
    name: str
    encoder: Any = None
    bf16: bool = False
    texts: dict = field(default_factory=dict)
    y: dict = field(default_factory=dict)
    ids: dict = field(default_factory=dict)
    tokenised: dict = field(default_factory=dict)
    limit: int = 0
    max_length: int = 0
    audit: dict = field(default_factory=dict)
    choices: list[dict] = field(default_factory=list)
    class_weight: Any = None
    train_cfg: Any = None
    boot: Any = None
    ladder: list[dict] = field(default_factory=list)
    boots: dict = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return self.splits.labels

    @property
    def lora(self) -> bool:
        return self.train_cfg.method == "lora"  # auto = full fine-tuning for an encoder

    @property
    def learning_rate(self) -> float:
        t = self.train_cfg
        return (t.lora_learning_rate or t.learning_rate * 10) if self.lora else t.learning_rate

    @property
    def head_learning_rate(self) -> float | None:
        """LoRA trains the head at the LoRA rate: no head rate, so fit keeps one rate (from_scratch has no head)."""
        return None if self.lora else self.train_cfg.head_learning_rate or self.train_cfg.learning_rate * HEAD_LR_FACTOR

    def rung(self, name: str, description: str, predictions, train_examples: int, train_seconds: float, **extra) -> dict:
        """Score `predictions` on the test split, add the row to the ladder (its bootstrap draws kept for the verdict)."""
        row, self.boots[name] = classification_rung(name, description, self.y["test"], predictions, self.labels, self.boot, train_examples, train_seconds, self.primary, **extra)
        self.ladder.append(row)
        return row


def _start(cfg: RunConfig, command: str) -> _Run:
    """Load and split the data and check the model (input problems stop the run before any folder is created), then
    open the run folder (rank 0 writes; every rank reads rank 0's checkpoints)."""
    import torch

    from fmtune import audit as audit_mod
    from fmtune import data, distributed, models

    primary = classification_primary(cfg)
    started, wall_start, io_start, log = datetime.now(timezone.utc), time.perf_counter(), disk_io(), []
    with stage("load and split data", log):
        splits = data.load_splits(cfg.data, cfg.seed)
        redacted: dict[str, int] = {}
        if cfg.data.redact_pii:
            splits, redacted = audit_mod.redact_splits(splits)
        unknown = sorted(set(cfg.data.label_descriptions) - set(splits.labels))
        if unknown:
            raise ConfigError(f"--label-descriptions names label(s) {unknown} that the data does not have; labels are {splits.labels}.")
    model_path = models.resolve_model_path(cfg.model.model or "minilm")
    models.check_safe_folder(model_path)
    tokenizer = models.load_tokenizer(model_path)  # a broken tokenizer stops the run before any folder is created
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = models.default_device()
    world = distributed.init(device.type)
    if world.distributed and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    out, tmp = _open_folder(cfg, world)
    name = cfg.name or out.name
    if world.main:
        record(out, name, "running", work_dir=tmp)
    return _Run(cfg, command, primary, started, wall_start, io_start, log, splits, redacted, model_path, tokenizer, device, world, out, tmp, name)


def _open_folder(cfg: RunConfig, world) -> tuple[Path, Path]:
    out = tmp = None
    if world.main:
        out, tmp, resuming = open_run_dir(cfg, run_name(cfg))
        if resuming:
            console.print(f"[cyan]Resuming the unfinished run in {tmp}[/] (finished rungs are reused; training continues from the last checkpoint).")
            (tmp / "STATUS").unlink(missing_ok=True)
        (tmp / "logs").mkdir(parents=True, exist_ok=True)
        (tmp / "config.yaml").write_text(to_yaml(cfg))
    if world.distributed:  # every rank reads checkpoints from rank 0's folder; only rank 0 writes
        import torch.distributed as dist

        paths = [str(out), str(tmp)] if world.main else [None, None]
        dist.broadcast_object_list(paths, src=0)
        out, tmp = Path(paths[0]), Path(paths[1])
        console.quiet = not world.main
    return out, tmp


def _prepare(r: _Run) -> None:
    """Tokenise, audit, and the choices derived from the data: max length, class weights, bf16, the epoch limit."""
    from fmtune import audit as audit_mod
    from fmtune import models, tokens, train
    from fmtune.evaluate import bootstrap_indices

    cfg, labels = r.cfg, r.labels
    r.encoder = models.load_encoder(r.model_path).to(r.device)
    r.bf16 = {"on": True, "off": False}.get(cfg.train.bf16, models.bf16_supported(r.device))
    r.texts = {s: [e.text for e in getattr(r.splits, s)] for s in ("train", "validation", "test")}
    label_index = {lab: i for i, lab in enumerate(labels)}
    r.y = {s: np.array([label_index[e.label] for e in getattr(r.splits, s)], dtype=np.int64) for s in r.texts}
    with stage("tokenise", r.log):
        r.tokenised = {s: tokens.tokenise(r.tokenizer, t, use_cache=cfg.train.token_cache) for s, t in r.texts.items()}
    with stage("audit data", r.log):
        lengths = {s: t.lengths for s, t in r.tokenised.items()}
        r.limit = models.model_token_limit(r.encoder.config, r.tokenizer)
        r.max_length, max_length_why = choose_max_length(lengths["train"], r.limit, cfg.model.max_length)
        r.audit = audit_mod.audit(r.splits, token_lengths=lengths, max_length=r.max_length, redacted=r.redacted, model_limit=r.limit)
        if "zero_shot" in cfg.eval.rungs:
            r.audit["warnings"] += _meaningless_label_names(labels, cfg.data.label_descriptions)
        special = set(r.tokenizer.all_special_ids) - {r.tokenizer.unk_token_id}
        r.audit["vocabulary"], vocabulary_warnings = audit_mod.vocabulary_coverage(r.texts["train"], r.tokenised["train"].ids, r.tokenizer.unk_token_id, special)
        r.audit["warnings"] += vocabulary_warnings
    r.choices = [{"setting": "max_length", "value": r.max_length, "why": max_length_why}]
    r.class_weight, cw_why = train.class_weight_vector(r.y["train"], len(labels), cfg.train.class_weights)
    r.choices.append({"setting": "class_weights", "value": None if r.class_weight is None else [round(float(w), 4) for w in r.class_weight], "why": cw_why})
    bf16_why = " (hardware supports bf16)" if r.bf16 and cfg.train.bf16 == "auto" else " (no bf16 support detected)" if cfg.train.bf16 == "auto" else ""
    r.choices.append({"setting": "bf16", "value": r.bf16, "why": f"--bf16 {cfg.train.bf16}{bf16_why}"})
    epochs, epochs_why = max_epochs(len(r.y["train"]), cfg.train)
    r.train_cfg = cfg.train.model_copy(update={"epochs": epochs})  # the limit trained with; cfg stays as given (config.yaml, manifest)
    r.choices.append({"setting": "max_epochs", "value": epochs, "why": epochs_why})
    r.boot = bootstrap_indices(len(r.y["test"]), cfg.eval.bootstrap, cfg.seed)
    r.ids = {s: tokens.truncate(r.tokenizer, t, r.tokenised[s].ids, r.max_length) for s, t in r.texts.items()}  # what every model sees


def _no_training_rungs(r: _Run) -> dict:
    """zero_shot, few_shot, head_only on the base encoder's frozen embeddings; returns the embeddings per split."""
    from fmtune import baselines
    from fmtune.evaluate import embed

    cfg, bs = r.cfg, r.cfg.eval.eval_batch_size
    with stage("embed texts with the base model", r.log), progress_bar() as prog:
        total = sum(len(t) for t in r.texts.values())
        task = prog.add_task("embedding", total=total, info="")
        t0 = time.perf_counter()
        emb = {s: embed(r.encoder, r.tokenizer, t, r.max_length, bs, r.bf16, lambda n: prog.advance(task, n), r.ids[s]) for s, t in r.texts.items()}
        per_text = (time.perf_counter() - t0) / max(total, 1)
        label_texts = [cfg.data.label_descriptions.get(lab, lab.replace("_", " ")) for lab in r.labels]
        label_emb = embed(r.encoder, r.tokenizer, label_texts, r.max_length, bs, r.bf16)
    embedded = baselines.Embedded(emb["train"], emb["validation"], emb["test"], r.y["train"], r.y["validation"], r.labels, label_texts, label_emb, per_text, cfg.seed, cfg.eval.few_shot_k)
    for rung_name, fn in baselines.BASELINES.items():
        if rung_name in cfg.eval.rungs:
            with stage(f"rung {rung_name}", r.log):
                res = fn(embedded)
                r.rung(rung_name, res.description, res.predictions, res.train_examples, res.train_seconds)
    return emb


def _trained_rungs(r: _Run):
    """fine_tuned (full or LoRA) and from_scratch; the choices the fine-tune made. Returns the fine-tune's TrainResult."""
    t, lr, head_lr = r.train_cfg, r.learning_rate, r.head_learning_rate
    method = "lora" if r.lora else "full"
    with stage(f"rung fine_tuned ({method})", r.log):
        ft, pred, eval_s, n = _train_rung(r, "fine-tuning", "fine_tuned", None, False, lr, r.lora)
        desc = f"{'LoRA (r=' + str(t.lora_r) + ', merged)' if r.lora else 'full'} fine-tuning of the base FM on all training data, best validation epoch ({ft.best_epoch} of {ft.epochs_run})"
        row = r.rung("fine_tuned", desc, pred, n, ft.train_seconds, eval_seconds=round(eval_s, 3), history=ft.history, best_epoch=ft.best_epoch, stopped=ft.stopped,
                     learning_rate=lr, head_learning_rate=head_lr, method=method, still_improving=_still_improving(ft, t))
        if r.world.main:
            (r.tmp / "logs" / "history_fine_tuned.jsonl").write_text("".join(json.dumps(h) + "\n" for h in ft.history))
    r.choices.append({"setting": "epochs", "value": ft.best_epoch, "why": f"{ft.stopped}; best validation macro-F1 at epoch {ft.best_epoch} (max {t.epochs}, patience {t.patience})"
                      + (_undertrained_caveat(t) if row["still_improving"] else "")})
    r.choices.append({"setting": "learning_rate", "value": lr, "why": _learning_rate_why(t, r.lora)})
    if head_lr is not None:
        r.choices.append({"setting": "head_learning_rate", "value": head_lr, "why": _head_learning_rate_why(t)})
    if "from_scratch" in r.cfg.eval.rungs:
        with stage("rung from_scratch", r.log):
            sc, pred, eval_s, n = _train_rung(r, "from scratch", "from_scratch", None, True, t.scratch_learning_rate, False)
            desc = (f"same architecture, random init, same data and budget (max {t.epochs} epochs, early stopping with patience "
                    f"{t.patience + SCRATCH_EXTRA_PATIENCE}: a random model often needs a few epochs to leave chance level), lr {t.scratch_learning_rate:g} "
                    f"warmed up over {max(t.warmup_ratio, SCRATCH_WARMUP):.0%} of the steps")
            r.rung("from_scratch", desc, pred, n, sc.train_seconds, eval_seconds=round(eval_s, 3), history=sc.history, best_epoch=sc.best_epoch, stopped=sc.stopped,
                   learning_rate=t.scratch_learning_rate)
            del sc
    return ft


def _train_rung(r: _Run, label: str, key: str, subset: np.ndarray | None, from_scratch: bool, lr: float, use_lora: bool):
    """Train one rung (or reuse it, finished, from an interrupted run) and predict the test split:
    (TrainResult, test predictions, evaluation seconds, training examples)."""
    import torch

    from fmtune import checkpoint, models, train

    torch.manual_seed(r.cfg.seed)
    model, head = models.load_classifier_and_head(r.model_path, r.labels, from_scratch=from_scratch, dropout=r.train_cfg.dropout)
    model = model.to(r.device)
    idx = np.arange(len(r.y["train"])) if subset is None else subset
    ckpt = r.tmp / "checkpoints" / key
    pad_id = r.tokenizer.pad_token_id if r.tokenizer.pad_token_id is not None else 0
    bs = r.cfg.eval.eval_batch_size
    finished = checkpoint.load_done(ckpt)
    if finished is not None:  # a resumed run: this rung finished before the interruption
        info, weights = finished
        saved_pred = info.pop("test_predictions", None)
        if weights is not None:
            model.load_state_dict(weights)
        model.eval()
        console.print(f"  {label}: reusing the finished rung from the interrupted run")
        result = train.TrainResult(model, **info)
        pred = np.asarray(saved_pred, dtype=np.int64) if saved_pred is not None else train.evaluate_split(model, r.ids["test"], r.y["test"], pad_id, bs, r.bf16)[1]
        return result, pred, 0.0, len(idx)
    result = _fit(r, label, model, head, idx, from_scratch, lr, use_lora, ckpt)
    t0 = time.perf_counter()
    _, pred = train.evaluate_split(result.model, r.ids["test"], r.y["test"], pad_id, bs, r.bf16)
    eval_seconds = time.perf_counter() - t0
    if r.world.main:
        keep_model = key == "fine_tuned"  # the only rung whose model is used after scoring (saved, probed, timed)
        if keep_model and result.adapter is not None:  # the curve's LoRA subsets must not replace the fine-tune's adapter
            from safetensors.torch import save_file

            adapter_dir = r.tmp / "adapter"
            result.adapter["config"].save_pretrained(adapter_dir)
            save_file(result.adapter["state"], str(adapter_dir / "adapter_model.safetensors"))
        info = {k: getattr(result, k) for k in ("history", "best_epoch", "epochs_run", "steps", "train_seconds", "stopped", "levers", "real_tokens")}
        checkpoint.mark_done(ckpt, result.model if keep_model else None, info if keep_model else {**info, "test_predictions": pred.tolist()})
    return result, pred, eval_seconds, len(idx)


def _fit(r: _Run, label: str, model, head, idx: np.ndarray, from_scratch: bool, lr: float, use_lora: bool, ckpt: Path):
    from fmtune import train

    t = r.train_cfg
    with progress_bar() as prog:
        task = prog.add_task(label, total=len(idx) * t.epochs, info="")

        def progress(n: int, row: dict) -> None:
            prog.advance(task, n)
            if row:
                info = f"epoch {row['epoch']}: train loss {row['train_loss']:.4f}, val loss {row['val_loss']:.4f}, val macro-F1 {row['val_macro_f1']:.3f} ({row['seconds']:.0f} s)"
                prog.update(task, info=f"epoch {row['epoch']} val macro-F1 {row['val_macro_f1']:.3f}")
                prog.console.print(f"  {label} {info}")

        # a randomly initialised encoder often sits at chance level for its first epochs before it starts to learn
        # (MiniLM on the quickstart: 2 epochs at loss 0.69, then 0.49 in the third); SCRATCH_EXTRA_PATIENCE more
        # epochs of patience keep early stopping from ending it on that plateau, within the same max-epochs budget;
        # SCRATCH_WARMUP of the steps warm up its learning rate (with the fine-tune's 6% the quickstart's random
        # MiniLM sat at the majority class for all 5 epochs it was given, test macro-F1 0.366; with 20%, 0.671)
        rung_cfg = t.model_copy(update={"patience": t.patience + SCRATCH_EXTRA_PATIENCE, "warmup_ratio": max(t.warmup_ratio, SCRATCH_WARMUP)}) if from_scratch else t
        return train.fit(model, r.tokenizer, ([r.ids["train"][i] for i in idx], r.y["train"][idx]), (r.ids["validation"], r.y["validation"]), rung_cfg,
                         learning_rate=lr, n_classes=len(r.labels), seed=r.cfg.seed, bf16=r.bf16, lora=use_lora, class_weight=r.class_weight,
                         eval_batch_size=r.cfg.eval.eval_batch_size, progress=progress, checkpoint_dir=ckpt, world=r.world, head=head,
                         head_learning_rate=r.head_learning_rate)


def _learning_curve(r: _Run, ft) -> tuple[dict, float]:
    """The fine-tune on nested subsets of the training data, plus the full run as the last point, with a forecast."""
    from fmtune import learning_curve

    primary = r.primary
    if not r.cfg.evidence.curve:
        return {"metric": primary, "points": [], "skipped": "turned off with --no-curve"}, 0.0
    ft_row = next(row for row in r.ladder if row["name"] == "fine_tuned")
    seconds, points, curve_boots = 0.0, [], []
    with stage("learning curve", r.log):
        for frac, subset in learning_curve.nested_subsets(r.y["train"], r.cfg.evidence.curve_fractions, r.cfg.seed).items():
            res, pred, _, n = _train_rung(r, f"curve {frac:.1%}", f"curve-{frac:g}", subset, False, r.learning_rate, r.lora)
            row, b = classification_rung("curve", "", r.y["test"], pred, r.labels, r.boot, n, res.train_seconds, primary)
            seconds += res.train_seconds
            points.append({"fraction": frac, "train_examples": n, "metric": row["metrics"][primary], "ci95": row["ci95"][primary], "train_seconds": row["train_seconds"], "epochs": res.epochs_run})
            curve_boots.append(b)
        points.append({"fraction": 1.0, "train_examples": ft_row["train_examples"], "metric": ft_row["metrics"][primary], "ci95": ft_row["ci95"][primary], "train_seconds": ft_row["train_seconds"], "epochs": ft.epochs_run})
        curve_boots.append(r.boots["fine_tuned"])
    return {"metric": primary, "points": points, "forecast": learning_curve.forecast(points, curve_boots, r.cfg.evidence.target_metric)}, seconds


def _probes(r: _Run, tuned, train_emb) -> tuple[dict, dict]:
    """Retention of general knowledge (base vs tuned on general sentences) and the task data's domain shift."""
    from fmtune import domain_shift, retention, tokens
    from fmtune.evaluate import embed

    bs, limit, max_length = r.cfg.eval.eval_batch_size, r.limit, r.max_length
    with stage("retention and domain shift", r.log):
        docs, source = retention.general_documents(r.cfg.evidence.general_text)
        sents, owners = retention.sentences_by_document(docs)
        # whole sentences up to the model's limit, not the run's max_length: the same probe for every run on this model
        sent_ids = r.tokenizer(sents, truncation=True, max_length=limit, add_special_tokens=True)["input_ids"]  # once for both models
        gen_base = embed(r.encoder, r.tokenizer, sents, limit, bs, r.bf16, ids=sent_ids)
        gen_tuned = embed(tuned, r.tokenizer, sents, limit, bs, r.bf16, ids=sent_ids)
        retention_ = retention.retention(gen_base, gen_tuned, owners, source, r.cfg.evidence.max_forgetting)
        retention_["details"]["max_tokens"] = limit
        # the shift classifier compares like with like: general sentences cut where the task's texts were cut
        cut = any(len(ids) > max_length for ids in sent_ids)
        shift_base = embed(r.encoder, r.tokenizer, sents, max_length, bs, r.bf16, ids=tokens.truncate(r.tokenizer, sents, sent_ids, max_length)) if cut else gen_base
        shift = domain_shift.domain_shift(train_emb, shift_base, r.cfg.seed)
        shift["details"]["general_source"] = source
    return retention_, shift


def _save_and_measure(r: _Run, tuned) -> dict:
    """Save the model folder, then size and latency of the base and the tuned model on the same inputs."""
    from fmtune import inference

    with stage("save model", r.log):
        model_dir = r.tmp / "model"
        tuned.save_pretrained(model_dir, safe_serialization=True)
        r.tokenizer.save_pretrained(model_dir)
    with stage("measure size and latency", r.log):
        test = r.texts["test"]
        order = np.argsort([len(t) for t in test])
        sample = [test[i] for i in order[len(order) // 2 :]][:64] or test[:1]
        reps = r.cfg.evidence.latency_repeats
        return {
            "base": inference.describe(r.encoder, r.model_path, inference.latency(r.encoder, r.tokenizer, sample, r.max_length, r.bf16, reps)),
            "fine_tuned": inference.describe(tuned, model_dir, inference.latency(tuned, r.tokenizer, sample, r.max_length, r.bf16, reps)),
            "note": "Same inputs (median-length test texts), same precision, same threads; the base is the encoder, the tuned model is the encoder plus its classification head"
            + (", with the LoRA adapters merged into the weights" if r.lora else "") + ".",
        }


def _report(r: _Run, ft, curve: dict, curve_seconds: float, retention_: dict, shift: dict, inf: dict) -> dict:
    """The report.json dict (contract: shared/report.schema.json), cost and verdict included."""
    from fmtune import models, retention, verdict

    cfg, y = r.cfg, r.y
    cost_ = verdict.cost(r.ladder, models.hardware_description(), os.cpu_count() or 1, cfg.evidence.price_per_hour, curve_seconds, "classification")
    verdict_ = verdict.verdict(r.ladder, r.boots, r.primary, retention_, r.audit, curve, cost_)
    verdict_["gates"] = retention.gate(retention_, cfg.evidence.max_forgetting)
    levers = {**ft.levers, "token_cache": {s: t.source for s, t in r.tokenised.items()} if r.train_cfg.token_cache else "off",
              "tokenise_seconds": round(sum(t.seconds for t in r.tokenised.values()), 3)}
    return {
        "fmtune_version": __version__,
        "run": {"name": r.name, "status": "complete", "started_at": r.started.isoformat(timespec="seconds"), "finished_at": None,
                "wall_seconds": None, "seed": cfg.seed, "command": r.command, "stages": r.log},
        "task": {"type": "classification", "primary_metric": r.primary, "labels": r.labels},
        "data": {"train": len(y["train"]), "validation": len(y["validation"]), "test": len(y["test"]), "sha256": r.splits.sha256,
                 "files": r.splits.files, "dropped": r.splits.dropped, "audit": r.audit},
        "base_model": {"name": cfg.model.model or "minilm", "path": str(r.model_path), "parameters": models.count_parameters(r.encoder),
                       "sha256": models.weights_hash(r.model_path), "architecture": type(r.encoder).__name__, "max_length": r.max_length},
        "choices": r.choices,
        "levers": levers,
        "ladder": r.ladder,
        "retention": retention_,
        "domain_shift": shift,
        "learning_curve": curve,
        "cost": cost_,
        "inference": inf,
        "verdict": verdict_,
    }
