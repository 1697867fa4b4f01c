"""One run, one folder: data -> audit -> baselines -> fine-tune / from scratch / learning curve -> evidence -> report.

Each stage is a plain function in its own module; this module only wires them, times them, shows progress and writes the
run folder atomically (everything goes to a temporary folder that is renamed when the run is complete).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

import fmtune
from fmtune.config import RunConfig, to_yaml
from fmtune.errors import ConfigError, FmtuneError

console = Console(stderr=True)
PRIMARY = "macro_f1"  # the default primary metric of classification (--metric)


def classification_primary(cfg: RunConfig) -> str:
    """The metric the ladder, learning curve and verdict of a classification run are decided on (--metric)."""
    from fmtune.evaluate import CLASSIFICATION_METRICS

    metric = cfg.eval.metric or PRIMARY
    if metric not in CLASSIFICATION_METRICS:
        raise ConfigError(f"--metric {metric}: not a classification metric; choose one of {', '.join(CLASSIFICATION_METRICS)} (default {PRIMARY}).")
    return metric


class GateFailed(FmtuneError):
    """The run finished but failed a gate the user set (e.g. --max-forgetting)."""


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
    )


@contextlib.contextmanager
def stage(name: str, log: list[str]):
    """Print a line when a stage ends, with its wall time; keep it for logs/run.log."""
    start = time.perf_counter()
    console.print(f"[cyan]>[/] {name} ...")
    yield
    line = f"{name}: {time.perf_counter() - start:.1f} s"
    log.append(line)
    console.print(f"[green]✓[/] {line}")


def choose_max_length(train_lengths: list[int], model_limit: int, given: int | None) -> tuple[int, str]:
    """Max tokens per text: given, or the 99th percentile of training lengths rounded up to 8, capped by the model."""
    truncated = lambda m: sum(1 for n in train_lengths if n > m)  # noqa: E731
    if given is not None:
        m = min(given, model_limit)
        return m, f"set with --max-length {given}" + (f", capped at the model's limit {model_limit}" if given > model_limit else "") + f"; {truncated(m)} training texts truncated"
    p99 = int(np.percentile(train_lengths, 99))
    m = max(16, min(model_limit, int(np.ceil(p99 / 8) * 8)))
    why = f"99th percentile of training token lengths ({p99}) rounded up to a multiple of 8"
    if p99 > model_limit:
        why += f", capped at the model's limit {model_limit} (long texts: consider chunking)"
    return m, f"{why}; {truncated(m)} of {len(train_lengths)} training texts ({truncated(m) / max(len(train_lengths), 1):.1%}) truncated"


def model_token_limit(model_config, tokenizer) -> int:
    limits = [getattr(model_config, "max_position_embeddings", 512) or 512]
    if tokenizer.model_max_length and tokenizer.model_max_length < 100_000:
        limits.append(tokenizer.model_max_length)
    return int(min(limits))


def run_name(cfg: RunConfig) -> str:
    if cfg.name:
        return cfg.name
    src = cfg.data.data or cfg.data.train
    stem = Path(str(src)).name.split(".")[0] if src else "run"
    return f"{stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _comparable(cfg: RunConfig) -> dict:
    """The config without the keys that only say where and how to (re)start."""
    d = cfg.model_dump(mode="json")
    for key in ("name", "out", "overwrite", "resume"):
        d.pop(key, None)
    return d


def partial_dir(out: Path) -> Path:
    """Where an unfinished run lives until it is complete (a stable name, so that a re-run finds it)."""
    return out.parent / f".{out.name}.partial"


def _find_resumable(cfg: RunConfig) -> Path | None:
    import yaml

    root = Path(cfg.out).parent if cfg.out else Path("runs")
    candidates = sorted(root.glob(".*.partial"), key=lambda p: p.stat().st_mtime, reverse=True)
    for folder in candidates:
        try:
            saved = RunConfig.model_validate(yaml.safe_load((folder / "config.yaml").read_text()))
        except Exception:
            continue
        if _comparable(saved) == _comparable(cfg):
            return folder.parent / folder.name[1 : -len(".partial")]
    return None


def prepare_out_dir(cfg: RunConfig, name: str) -> Path:
    """The final run folder (kept for callers that manage their own temporary folder)."""
    return open_run_dir(cfg, name)[0]


def open_run_dir(cfg: RunConfig, name: str) -> tuple[Path, Path, bool]:
    """(final folder, partial folder, resuming?) after checking what is already on disk."""
    import yaml

    out = Path(cfg.out) if cfg.out else Path("runs") / name
    if cfg.resume and not (cfg.name or cfg.out):
        found = _find_resumable(cfg)
        if found is None:
            raise ConfigError("--resume: no unfinished run with this configuration under runs/. Pass --name/--out of the run to resume, or drop --resume.")
        out = found
    check_run_target(out)
    partial = partial_dir(out)
    if out.exists() or out.is_symlink():
        if not cfg.overwrite:
            raise ConfigError(f"{out} already exists. Fix: pass --overwrite to replace it (only an fmtune run folder or an empty folder is replaced), or --name/--out for a new run folder.")
        check_replaceable(out)
    resuming = False
    if partial.exists() or partial.is_symlink():
        try:
            saved = RunConfig.model_validate(yaml.safe_load((partial / "config.yaml").read_text()))
            same = _comparable(saved) == _comparable(cfg)
            ours = True
        except Exception:
            same, ours = False, False
        if same and not cfg.overwrite:
            resuming = True
        elif cfg.overwrite:
            if not ours and not _is_empty_dir(partial):
                raise ConfigError(f"{partial} is in the place of this run's unfinished folder but holds no fmtune run configuration (config.yaml); fmtune deletes only what it created. "
                                  "Fix: move it away, or pass --name/--out for a new run.")
            shutil.rmtree(partial)
        else:
            raise ConfigError(f"{partial} holds an unfinished run with a different configuration. Fix: pass --overwrite to discard it, or --name/--out for a new run.")
    elif cfg.resume:
        raise ConfigError(f"--resume: there is no unfinished run at {partial}.")
    return out, partial, resuming


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and next(path.iterdir(), None) is None


def is_fmtune_run(path: Path) -> bool:
    """Whether `path` holds a finished fmtune run: a manifest.json that fmtune wrote (manifest and fmtune versions)."""
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "manifest_version" in manifest and "fmtune_version" in manifest


def check_run_target(out: Path) -> None:
    """Refuse run folders whose replacement would destroy a user's files: the filesystem root, the home folder, the
    current folder or any folder above it (a run is written beside its folder and renamed into place)."""
    where = Path(out).expanduser().resolve()
    cwd = Path.cwd().resolve()
    home = Path.home().resolve()
    reasons = []
    if where == Path(where.anchor):
        reasons.append("it is the filesystem root")
    if where == home:
        reasons.append("it is your home folder")
    if where == cwd or where in cwd.parents:
        reasons.append("it is the current folder" if where == cwd else "it holds the current folder")
    if reasons:
        raise ConfigError(f"--out {out}: cannot be a run folder: {' and '.join(reasons)} ({where}). A run folder is replaced as a whole, "
                          "so fmtune refuses it. Fix: name a new folder, e.g. --out runs/my-run.")


def check_replaceable(out: Path) -> None:
    """--overwrite replaces only what fmtune created: a finished run folder (its manifest.json) or an empty folder."""
    if out.is_symlink() or not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is {'a symbolic link' if out.is_symlink() else 'not a folder'}; fmtune replaces only a run folder it wrote. "
                          "Fix: pass --name/--out for a new run folder.")
    if is_fmtune_run(out) or _is_empty_dir(out):
        return
    entries = sorted(p.name for p in out.iterdir())
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    raise ConfigError(f"--out {out}: --overwrite replaces only an fmtune run folder (one with fmtune's manifest.json) or an empty folder, "
                      f"and {out} holds other files ({shown}). Nothing was deleted. Fix: pass --name/--out for a new run folder, "
                      "or move those files away yourself.")


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


def _rung(name: str, description: str, y_true, y_pred, labels, boot, train_examples: int, train_seconds: float, primary: str = PRIMARY, **extra) -> tuple[dict, np.ndarray]:
    from fmtune.evaluate import classification_metrics

    m = classification_metrics(np.asarray(y_true), np.asarray(y_pred), labels, boot, primary)
    boot_primary = m.pop("_boot_primary")
    row = {"name": name, "description": description, **m, "train_examples": int(train_examples), "train_seconds": round(float(train_seconds), 3), **extra}
    return row, boot_primary


HEAD_LR_FACTOR = 30  # the new classifier head's learning rate over the encoder's (see _head_learning_rate_why)
SCRATCH_EXTRA_PATIENCE = 2  # from_scratch rung: extra early-stopping patience (see train_rung)
SCRATCH_WARMUP = 0.2  # from_scratch rung: at least this share of its steps warms the learning rate up (see train_rung)


def _is_causal_lm(name: str | None) -> bool:
    from fmtune.causal_lm import is_causal_lm

    return is_causal_lm(name)


def run(cfg: RunConfig, command: str = "fmtune run", show_summary: bool = True) -> Path:
    """Run the whole evidence pipeline; returns the finished run folder. `show_summary` prints the ladder, the audit
    warnings and the verdict on stdout at the end."""
    import torch

    from fmtune import audit as audit_mod
    from fmtune import baselines, checkpoint, data, distributed, domain_shift, inference, learning_curve, models, retention, tokens, train, verdict
    from fmtune.evaluate import bootstrap_indices, embed

    from transformers.utils import logging as hf_logging

    from fmtune import gen_data

    hf_logging.disable_progress_bar()  # fmtune shows its own progress
    causal = gen_data.detect_task(cfg.data) == "generation" or _is_causal_lm(cfg.model.model)
    if causal and distributed.world().distributed:  # every rank would run the whole pipeline and write the same folder
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
    if gen_data.detect_task(cfg.data) == "generation":
        from fmtune.gen_pipeline import run_generation

        return run_generation(cfg, command, show_summary)
    if _is_causal_lm(cfg.model.model):  # classification with a causal LM: the label word as the answer
        from fmtune.gen_pipeline import run_lm_classification

        return run_lm_classification(cfg, command, show_summary)
    primary = classification_primary(cfg)
    started = datetime.now(timezone.utc)
    wall_start = time.perf_counter()
    io_start = disk_io()
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
    name = cfg.name or out.name
    if world.main:
        _record(out, name, "running", work_dir=tmp)
    try:
        encoder = models.load_encoder(model_path).to(device)
        bf16 = {"on": True, "off": False}.get(cfg.train.bf16, models.bf16_supported(device))
        texts = {s: [e.text for e in getattr(splits, s)] for s in ("train", "validation", "test")}
        label_index = {lab: i for i, lab in enumerate(labels)}
        y = {s: np.array([label_index[e.label] for e in getattr(splits, s)], dtype=np.int64) for s in texts}
        with stage("tokenise", log):
            tokenised = {s: tokens.tokenise(tokenizer, t, use_cache=cfg.train.token_cache) for s, t in texts.items()}
        with stage("audit data", log):
            lengths = {s: r.lengths for s, r in tokenised.items()}
            limit = model_token_limit(encoder.config, tokenizer)
            max_length, max_length_why = choose_max_length(lengths["train"], limit, cfg.model.max_length)
            audit = audit_mod.audit(splits, token_lengths=lengths, max_length=max_length, redacted=redacted, model_limit=limit)
            if "zero_shot" in cfg.eval.rungs:
                audit["warnings"] += _meaningless_label_names(labels, cfg.data.label_descriptions)
            audit["vocabulary"], vocabulary_warnings = audit_mod.vocabulary_coverage(texts["train"], tokenised["train"].ids, tokenizer.unk_token_id, set(tokenizer.all_special_ids) - {tokenizer.unk_token_id})
            audit["warnings"] += vocabulary_warnings
        choices = [{"setting": "max_length", "value": max_length, "why": max_length_why}]
        class_weight, cw_why = train.class_weight_vector(y["train"], len(labels), cfg.train.class_weights)
        choices.append({"setting": "class_weights", "value": None if class_weight is None else [round(float(w), 4) for w in class_weight], "why": cw_why})
        choices.append({"setting": "bf16", "value": bf16, "why": f"--bf16 {cfg.train.bf16}" + (" (hardware supports bf16)" if bf16 and cfg.train.bf16 == "auto" else " (no bf16 support detected)" if cfg.train.bf16 == "auto" else "")})
        epochs, epochs_why = max_epochs(len(y["train"]), cfg.train)
        train_cfg = cfg.train.model_copy(update={"epochs": epochs})  # the limit trained with; cfg stays as given (config.yaml, manifest)
        choices.append({"setting": "max_epochs", "value": epochs, "why": epochs_why})
        boot = bootstrap_indices(len(y["test"]), cfg.eval.bootstrap, seed)
        ladder: list[dict] = []
        boots: dict[str, np.ndarray] = {}

        ids = {s: tokens.truncate(tokenizer, t, tokenised[s].ids, max_length) for s, t in texts.items()}  # what every model sees

        # ---- no-training rungs on frozen embeddings
        with stage("embed texts with the base model", log), _progress() as prog:
            total = sum(len(t) for t in texts.values())
            task = prog.add_task("embedding", total=total, info="")
            t0 = time.perf_counter()
            emb = {s: embed(encoder, tokenizer, t, max_length, cfg.eval.eval_batch_size, bf16, lambda n: prog.advance(task, n), ids[s]) for s, t in texts.items()}
            per_text = (time.perf_counter() - t0) / max(total, 1)
            label_texts = [cfg.data.label_descriptions.get(lab, lab.replace("_", " ")) for lab in labels]
            label_emb = embed(encoder, tokenizer, label_texts, max_length, cfg.eval.eval_batch_size, bf16)
        embedded = baselines.Embedded(emb["train"], emb["validation"], emb["test"], y["train"], y["validation"], labels, label_texts, label_emb, per_text, seed, cfg.eval.few_shot_k)
        for rung_name, fn in baselines.BASELINES.items():
            if rung_name not in cfg.eval.rungs:
                continue
            with stage(f"rung {rung_name}", log):
                res = fn(embedded)
                row, b = _rung(rung_name, res.description, y["test"], res.predictions, labels, boot, res.train_examples, res.train_seconds, primary)
                ladder.append(row)
                boots[rung_name] = b

        # ---- trained rungs
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        lora = train_cfg.method == "lora"  # auto = full fine-tuning for an encoder
        ft_lr = (train_cfg.lora_learning_rate or train_cfg.learning_rate * 10) if lora else train_cfg.learning_rate

        # LoRA trains the head at the LoRA rate: no head rate, so fit keeps one rate (from_scratch has no head: every parameter is new)
        head_lr = None if lora else train_cfg.head_learning_rate or train_cfg.learning_rate * HEAD_LR_FACTOR

        def train_rung(label: str, key: str, subset: np.ndarray | None, from_scratch: bool, lr: float, use_lora: bool):
            torch.manual_seed(seed)
            model, head = models.load_classifier_and_head(model_path, labels, from_scratch=from_scratch, dropout=train_cfg.dropout)
            model = model.to(device)
            idx = np.arange(len(y["train"])) if subset is None else subset
            tr = ([ids["train"][i] for i in idx], y["train"][idx])
            ckpt = tmp / "checkpoints" / key
            finished = checkpoint.load_done(ckpt)
            if finished is not None:  # a resumed run: this rung finished before the interruption
                info, weights = finished
                saved_pred = info.pop("test_predictions", None)
                if weights is not None:
                    model.load_state_dict(weights)
                model.eval()
                console.print(f"  {label}: reusing the finished rung from the interrupted run")
                result = train.TrainResult(model, **info)
                if saved_pred is not None:
                    return result, np.asarray(saved_pred, dtype=np.int64), 0.0, len(idx)
                _, pred = train.evaluate_split(model, ids["test"], y["test"], pad_id, cfg.eval.eval_batch_size, bf16)
                return result, pred, 0.0, len(idx)
            with _progress() as prog:
                task = prog.add_task(label, total=len(idx) * train_cfg.epochs, info="")

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
                rung_cfg = train_cfg.model_copy(update={"patience": train_cfg.patience + SCRATCH_EXTRA_PATIENCE, "warmup_ratio": max(train_cfg.warmup_ratio, SCRATCH_WARMUP)}) if from_scratch else train_cfg
                result = train.fit(model, tokenizer, tr, (ids["validation"], y["validation"]), rung_cfg, learning_rate=lr, n_classes=len(labels),
                                   seed=seed, bf16=bf16, lora=use_lora, class_weight=class_weight, eval_batch_size=cfg.eval.eval_batch_size, progress=progress,
                                   checkpoint_dir=ckpt, world=world, head=head, head_learning_rate=head_lr)
            t0 = time.perf_counter()
            _, pred = train.evaluate_split(result.model, ids["test"], y["test"], pad_id, cfg.eval.eval_batch_size, bf16)
            eval_seconds = time.perf_counter() - t0
            if world.main:
                keep_model = key == "fine_tuned"  # the only rung whose model is used after scoring (saved, probed, timed)
                if keep_model and result.adapter is not None:  # the curve's LoRA subsets must not replace the fine-tune's adapter
                    from safetensors.torch import save_file

                    adapter_dir = tmp / "adapter"
                    result.adapter["config"].save_pretrained(adapter_dir)
                    save_file(result.adapter["state"], str(adapter_dir / "adapter_model.safetensors"))
                info = {k: getattr(result, k) for k in ("history", "best_epoch", "epochs_run", "steps", "train_seconds", "stopped", "levers", "real_tokens")}
                checkpoint.mark_done(ckpt, result.model if keep_model else None, info if keep_model else {**info, "test_predictions": pred.tolist()})
            return result, pred, eval_seconds, len(idx)

        method = "lora" if lora else "full"
        with stage(f"rung fine_tuned ({method})", log):
            ft, ft_pred, ft_eval_s, n = train_rung("fine-tuning", "fine_tuned", None, False, ft_lr, lora)
            desc = f"{'LoRA (r=' + str(train_cfg.lora_r) + ', merged)' if lora else 'full'} fine-tuning of the base FM on all training data, best validation epoch ({ft.best_epoch} of {ft.epochs_run})"
            row, b = _rung("fine_tuned", desc, y["test"], ft_pred, labels, boot, n, ft.train_seconds, primary, eval_seconds=round(ft_eval_s, 3), history=ft.history, best_epoch=ft.best_epoch, stopped=ft.stopped, learning_rate=ft_lr, head_learning_rate=head_lr, method=method,
                          still_improving=_still_improving(ft, train_cfg))
            ladder.append(row)
            boots["fine_tuned"] = b
            if world.main:
                (tmp / "logs" / "history_fine_tuned.jsonl").write_text("".join(json.dumps(h) + "\n" for h in ft.history))
        choices.append({"setting": "epochs", "value": ft.best_epoch, "why": f"{ft.stopped}; best validation macro-F1 at epoch {ft.best_epoch} (max {train_cfg.epochs}, patience {train_cfg.patience})" + (_undertrained_caveat(train_cfg) if row["still_improving"] else "")})
        choices.append({"setting": "learning_rate", "value": ft_lr, "why": _learning_rate_why(train_cfg, lora)})
        if head_lr is not None:
            choices.append({"setting": "head_learning_rate", "value": head_lr, "why": _head_learning_rate_why(train_cfg)})
        if "from_scratch" in cfg.eval.rungs:
            with stage("rung from_scratch", log):
                sc, sc_pred, sc_eval_s, n = train_rung("from scratch", "from_scratch", None, True, train_cfg.scratch_learning_rate, False)
                desc = (f"same architecture, random init, same data and budget (max {train_cfg.epochs} epochs, early stopping with patience "
                        f"{train_cfg.patience + SCRATCH_EXTRA_PATIENCE}: a random model often needs a few epochs to leave chance level), lr {train_cfg.scratch_learning_rate:g} "
                        f"warmed up over {max(train_cfg.warmup_ratio, SCRATCH_WARMUP):.0%} of the steps")
                row, b = _rung("from_scratch", desc, y["test"], sc_pred, labels, boot, n, sc.train_seconds, primary, eval_seconds=round(sc_eval_s, 3), history=sc.history, best_epoch=sc.best_epoch, stopped=sc.stopped, learning_rate=train_cfg.scratch_learning_rate)
                ladder.append(row)
                boots["from_scratch"] = b
                del sc

        # ---- learning curve
        curve_seconds = 0.0
        ft_row = next(r for r in ladder if r["name"] == "fine_tuned")
        if cfg.evidence.curve:
            with stage("learning curve", log):
                points, curve_boots = [], []
                for frac, subset in learning_curve.nested_subsets(y["train"], cfg.evidence.curve_fractions, seed).items():
                    res, pred, _, n = train_rung(f"curve {frac:.1%}", f"curve-{frac:g}", subset, False, ft_lr, lora)
                    row, b = _rung("curve", "", y["test"], pred, labels, boot, n, res.train_seconds, primary)
                    curve_seconds += res.train_seconds
                    points.append({"fraction": frac, "train_examples": n, "metric": row["metrics"][primary], "ci95": row["ci95"][primary], "train_seconds": row["train_seconds"], "epochs": res.epochs_run})
                    curve_boots.append(b)
                points.append({"fraction": 1.0, "train_examples": ft_row["train_examples"], "metric": ft_row["metrics"][primary], "ci95": ft_row["ci95"][primary], "train_seconds": ft_row["train_seconds"], "epochs": ft.epochs_run})
                curve_boots.append(boots["fine_tuned"])
                curve = {"metric": primary, "points": points, "forecast": learning_curve.forecast(points, curve_boots, cfg.evidence.target_metric)}
        else:
            curve = {"metric": primary, "points": [], "skipped": "turned off with --no-curve"}

        if not world.main:  # the other ranks only take part in training; rank 0 measures and writes the rest
            return out
        # ---- retention and domain shift
        tuned = ft.model
        with stage("retention and domain shift", log):
            docs, source = retention.general_documents(cfg.evidence.general_text)
            sents, owners = retention.sentences_by_document(docs)
            # whole sentences up to the model's limit, not the run's max_length: the same probe for every run on this model
            sent_ids = tokenizer(sents, truncation=True, max_length=limit, add_special_tokens=True)["input_ids"]  # once for both models
            gen_base = embed(encoder, tokenizer, sents, limit, cfg.eval.eval_batch_size, bf16, ids=sent_ids)
            gen_tuned = embed(tuned, tokenizer, sents, limit, cfg.eval.eval_batch_size, bf16, ids=sent_ids)
            retention_ = retention.retention(gen_base, gen_tuned, owners, source, cfg.evidence.max_forgetting)
            retention_["details"]["max_tokens"] = limit
            # the shift classifier compares like with like: general sentences cut where the task's texts were cut
            cut = any(len(r) > max_length for r in sent_ids)
            shift_base = embed(encoder, tokenizer, sents, max_length, cfg.eval.eval_batch_size, bf16, ids=tokens.truncate(tokenizer, sents, sent_ids, max_length)) if cut else gen_base
            shift = domain_shift.domain_shift(emb["train"], shift_base, seed)
            shift["details"]["general_source"] = source

        # ---- the model folder
        with stage("save model", log):
            model_dir = tmp / "model"
            tuned.save_pretrained(model_dir, safe_serialization=True)
            tokenizer.save_pretrained(model_dir)

        # ---- size and speed
        with stage("measure size and latency", log):
            order = np.argsort([len(t) for t in texts["test"]])
            sample = [texts["test"][i] for i in order[len(order) // 2 :]][:64] or texts["test"][:1]
            reps = cfg.evidence.latency_repeats
            inf = {
                "base": inference.describe(encoder, model_path, inference.latency(encoder, tokenizer, sample, max_length, bf16, reps)),
                "fine_tuned": inference.describe(tuned, model_dir, inference.latency(tuned, tokenizer, sample, max_length, bf16, reps)),
                "note": "Same inputs (median-length test texts), same precision, same threads; the base is the encoder, the tuned model is the encoder plus its classification head"
                + (", with the LoRA adapters merged into the weights" if lora else "") + ".",
            }

        hardware = models.hardware_description()
        cost_ = verdict.cost(ladder, hardware, os.cpu_count() or 1, cfg.evidence.price_per_hour, curve_seconds, "classification")
        verdict_ = verdict.verdict(ladder, boots, primary, retention_, audit, curve, cost_)
        verdict_["gates"] = retention.gate(retention_, cfg.evidence.max_forgetting)
        levers = {**ft.levers, "token_cache": {s: r.source for s, r in tokenised.items()} if train_cfg.token_cache else "off",
                  "tokenise_seconds": round(sum(r.seconds for r in tokenised.values()), 3)}
        report = {
            "fmtune_version": fmtune.__version__,
            "run": {"name": name, "status": "complete", "started_at": started.isoformat(timespec="seconds"), "finished_at": None,
                    "wall_seconds": None, "seed": seed, "command": command, "stages": log},
            "task": {"type": "classification", "primary_metric": primary, "labels": labels},
            "data": {"train": len(y["train"]), "validation": len(y["validation"]), "test": len(y["test"]), "sha256": splits.sha256,
                     "files": splits.files, "dropped": splits.dropped, "audit": audit},
            "base_model": {"name": cfg.model.model or "minilm", "path": str(model_path), "parameters": models.count_parameters(encoder),
                           "sha256": models.weights_hash(model_path), "architecture": type(encoder).__name__, "max_length": max_length},
            "choices": choices,
            "levers": levers,
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
        if world.main:
            _mark_interrupted(tmp, out)
            _record(out, name, "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed", work_dir=tmp)
        raise
    if show_summary:
        print_summary(report, out)
    raise_if_gate_failed(report, out)
    return out


def disk_io() -> dict[str, int] | None:
    """This process's bytes written so far: `write_bytes` reached the storage layer, `wchar` passed to write() (Linux)."""
    try:
        fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    except (OSError, ValueError):
        return None
    return {k: int(fields[k]) for k in ("write_bytes", "wchar", "cancelled_write_bytes") if k in fields}


def _disk_line(io_start: dict[str, int] | None, tmp: Path) -> str:
    """One line for logs/run.log: what the run wrote to disk, next to the size of what it keeps."""
    folder = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file() and not p.is_symlink())
    now = disk_io()
    if now is None or io_start is None:
        return f"disk: run folder {folder / 1e6:.1f} MB (bytes written not measured on this platform)"
    written = {k: now[k] - io_start.get(k, 0) for k in now}
    return (f"disk: {written['write_bytes'] / 1e6:.1f} MB written to storage by this run (/proc/self/io write_bytes; "
            f"{written['wchar'] / 1e6:.1f} MB passed to write(), {written.get('cancelled_write_bytes', 0) / 1e6:.1f} MB cancelled before reaching disk); "
            f"run folder {folder / 1e6:.1f} MB")


def finish(report: dict, cfg: RunConfig, tmp: Path, out: Path, wall_start: float, model_path: Path, io_start: dict[str, int] | None = None) -> None:
    """Write report.json, report.html, the model card and the manifest, then move the folder into place."""
    from fmtune import lineage, models, registry

    report["run"]["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    report["run"]["wall_seconds"] = round(time.perf_counter() - wall_start, 2)
    shutil.rmtree(tmp / "checkpoints", ignore_errors=True)  # only needed to resume an unfinished run
    lineage.write_json_atomic(tmp / "report.json", report)
    try:
        from fmtune import report_html

        report_html.write_html(report, tmp / "report.html")
        (tmp / "model" / "README.md").write_text(report_html.render_model_card(report))
    except ImportError:  # pragma: no cover - the HTML report module ships with fmtune
        pass
    (tmp / "logs" / "run.log").write_text("\n".join(report["run"]["stages"] + [_disk_line(io_start, tmp)]) + "\n")
    base_files = {p.name: lineage.sha256_file(p) for p in sorted(Path(model_path).glob("*.safetensors"))}
    manifest = lineage.build_manifest(
        config=cfg.model_dump(mode="json"), input_files={str(Path(p).resolve()): h for p, h in report["data"]["files"].items()}, data_sha256=report["data"]["sha256"],
        base_model={"name": report["base_model"]["name"], "path": str(model_path), "files": base_files}, seed=cfg.seed, run_dir=tmp,
        hardware=models.hardware_description(),
    )
    lineage.write_json_atomic(tmp / "manifest.json", manifest)
    replace_folder(tmp, out)
    try:
        registry.record_run(out, report, "complete")
    except Exception as exc:  # the registry is a convenience; it must never lose a run
        console.print(f"[yellow]warning:[/] could not record the run in the registry ({exc}).")


def replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished run into place; a folder already there is replaced only when fmtune wrote it (checked again
    here: it may have changed since the run started). The old run is renamed aside first, so a failure never leaves
    neither run in place."""
    check_run_target(out)
    if not (out.exists() or out.is_symlink()):
        os.replace(tmp, out)
        return
    check_replaceable(out)
    aside = out.parent / f".{out.name}.replaced-{os.getpid()}"
    os.replace(out, aside)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(aside, out)
        raise
    shutil.rmtree(aside)


def _record(run_dir: Path, name: str, status: str, work_dir: Path | None = None) -> None:
    """The registry row of the run whose final folder is `run_dir`; `work_dir` is where its unfinished files are."""
    from fmtune import registry

    try:
        registry.record_run(run_dir, {"run": {"name": name, "status": status}}, status, work_dir=work_dir)
    except Exception as exc:  # the registry is a convenience; it must never lose a run
        console.print(f"[yellow]warning:[/] could not record the run in the registry ({exc}).")


def _mark_interrupted(tmp: Path, out: Path, resumable: bool = True) -> None:
    """Leave the partial folder visibly unfinished, never in the final place, and say how to continue (causal-LM runs keep
    no checkpoints: re-running starts them again)."""
    if tmp.exists():
        how = "Re-run the same command (or add --resume) to continue." if resumable else "Re-run the same command to start it again (causal-LM runs keep no checkpoints yet)."
        (tmp / "STATUS").write_text(f"status: interrupted\nThis run did not finish; its outputs are incomplete. {how}\n")
        console.print(f"[yellow]The run did not finish (status: interrupted); partial outputs are in {tmp}. "
                      + ("Re-run the same command with --resume to continue from the last checkpoint.[/]" if resumable else f"{how}[/]"))


def raise_if_gate_failed(report: dict, out: Path) -> None:
    """After the summary is printed: GateFailed (exit 3) when the run failed a gate the user set (--max-forgetting)."""
    from fmtune import retention

    gates = report["verdict"].get("gates") or {}
    if not gates.get("passed", True):
        raise GateFailed(retention.gate_failure(report["retention"], gates["max_forgetting"], out))


def print_audit_warnings(warnings: list[str], out_console: Console) -> None:
    """Every audit finding (leakage, duplicates, personal data, unreadable or truncated texts, ...) in one block on the
    console: a warning that lives only inside report.json is a warning nobody reads."""
    if not warnings:
        return
    from rich.markup import escape

    out_console.print(f"[bold yellow]Data audit: {len(warnings)} warning(s)[/] (details under data.audit in report.json)")
    for w in warnings:
        out_console.print(f"  [yellow]![/] {escape(w)}")


def print_summary(report: dict, out: Path) -> None:
    primary = report["task"]["primary_metric"]
    second = next((m for m in ("accuracy", "token_f1", "exact_match", "perplexity") if m != primary and m in report["ladder"][0]["metrics"]), None)
    table = Table(title=f"fmtune ladder — {report['run']['name']} (test n={report['data']['test']})")
    for col in ("rung", primary, "95% CI", second or "", "train examples", "train s"):
        table.add_column(col, justify="left" if col == "rung" else "right")
    for r in report["ladder"]:
        lo, hi = r["ci95"][primary]
        other = f"{r['metrics'][second]:.3f}" if second and second in r["metrics"] else ""
        table.add_row(r["name"], f"{r['metrics'][primary]:.3f}", f"{lo:.3f}–{hi:.3f}", other, str(r["train_examples"]), f"{r['train_seconds']:.1f}")
    out_console = Console()
    out_console.print(table)
    print_audit_warnings(((report.get("data") or {}).get("audit") or {}).get("warnings") or [], out_console)
    v = report["verdict"]
    out_console.print(f"[bold]{'RECOMMEND' if v['recommend_fine_tuning'] else 'DO NOT RECOMMEND'} fine-tuning.[/] {v['headline']}")
    out_console.print(f"Report: {out / 'report.html'}  ·  {out / 'report.json'}  ·  model: {out / 'model'}  (wall {report['run']['wall_seconds']:.0f} s)")
