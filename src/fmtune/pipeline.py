"""One run, one folder: data -> audit -> baselines -> fine-tune / from scratch / learning curve -> evidence -> report.

Each stage is a plain function in its own module; this module only wires them, times them, shows progress and writes the
run folder atomically (everything goes to a temporary folder that is renamed when the run is complete).
"""

from __future__ import annotations

import json
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from fmtune.version import __version__
from fmtune.config import RunConfig, to_yaml
from fmtune.errors import ConfigError, FmtuneError
# the runner's shared parts, named here too for the callers that import them from fmtune.pipeline
from fmtune.runner.console import GateFailed, console, print_summary, progress_bar, raise_if_gate_failed, stage  # noqa: F401
from fmtune.runner.folder import (  # noqa: F401
    check_replaceable, check_run_target, disk_io, mark_interrupted, open_run_dir, partial_dir, record, replace_folder, run_name,
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
        record(out, name, "running", work_dir=tmp)
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
            limit = models.model_token_limit(encoder.config, tokenizer)
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
        with stage("embed texts with the base model", log), progress_bar() as prog:
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
                row, b = classification_rung(rung_name, res.description, y["test"], res.predictions, labels, boot, res.train_examples, res.train_seconds, primary)
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
            with progress_bar() as prog:
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
            row, b = classification_rung("fine_tuned", desc, y["test"], ft_pred, labels, boot, n, ft.train_seconds, primary, eval_seconds=round(ft_eval_s, 3), history=ft.history, best_epoch=ft.best_epoch, stopped=ft.stopped, learning_rate=ft_lr, head_learning_rate=head_lr, method=method,
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
                row, b = classification_rung("from_scratch", desc, y["test"], sc_pred, labels, boot, n, sc.train_seconds, primary, eval_seconds=round(sc_eval_s, 3), history=sc.history, best_epoch=sc.best_epoch, stopped=sc.stopped, learning_rate=train_cfg.scratch_learning_rate)
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
                    row, b = classification_rung("curve", "", y["test"], pred, labels, boot, n, res.train_seconds, primary)
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
            "fmtune_version": __version__,
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
            mark_interrupted(tmp, out)
            record(out, name, "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed", work_dir=tmp)
        raise
    if show_summary:
        print_summary(report, out)
    raise_if_gate_failed(report, out)
    return out


