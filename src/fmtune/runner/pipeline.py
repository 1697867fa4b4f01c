"""The one runner: data -> audit -> no-training rungs -> fine_tuned, from_scratch -> learning curve -> retention and
domain shift -> model, size and latency -> cost and verdict -> run folder. The same for every task kind; what differs
lives in the task (fmtune.tasks), which returns data: only this module builds the ladder and the report."""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from fmtune.config import RunConfig, TrainConfig, to_yaml
from fmtune.console import console, print_summary, stage, stage_lines
from fmtune.errors import GateFailed
from fmtune.runner.folder import disk_io, marked_on_failure, open_run_dir, record, run_name
from fmtune.runner.report import finish
from fmtune.tasks.base import Context, Prepared, Rung, Scored, check_supported
from fmtune.version import __version__


def run(cfg: RunConfig, command: str = "fmtune run", show_summary: bool = True) -> Path:
    """Run the whole evidence pipeline; returns the finished run folder. `show_summary` prints the ladder, the audit
    warnings and the verdict on stdout at the end; a failed --max-forgetting gate raises GateFailed once it is written."""
    r = _start(cfg, command)
    with marked_on_failure(r.out, r.tmp, r.name, resumable=r.task.supports.resume, main=r.world.main):
        _prepare(r)
        _no_training_rungs(r)
        ft = _trained_rungs(r)
        _compared_rungs(r)
        curve, curve_seconds = _learning_curve(r, ft)
        if not r.world.main:  # the other ranks only take part in training; rank 0 measures and writes the rest
            return r.out
        with stage("retention and domain shift", r.ctx.profile):
            retention_, shift = r.task.probes(r.ctx, ft.model)
        inf = _save_and_measure(r, ft)
        report = _report(r, ft, curve, curve_seconds, retention_, shift, inf)
        _tensorboard(r, report)
        finish(report, cfg, r.tmp, r.out, r.wall_start, r.prepared.model_path, r.io_start)
    _mlflow(r, report)
    if show_summary:
        print_summary(report, r.out)
    raise_if_gate_failed(report, r.out)
    return r.out


@dataclass
class _Run:
    """What the runner's stages share; the ladder and its bootstrap draws grow as rungs finish."""

    cfg: RunConfig
    command: str
    task: Any
    ctx: Context
    started: datetime
    wall_start: float
    io_start: dict | None
    out: Path
    tmp: Path
    name: str
    prepared: Prepared | None = None
    ladder: list[dict] = field(default_factory=list)
    boots: dict = field(default_factory=dict)
    rates: dict = field(default_factory=dict)  # the learning rate each trained rung settled on (the search's winner)
    compared: list = field(default_factory=list)  # other models' outputs on the test inputs (--compare), read before the folder opens

    @property
    def world(self):
        return self.ctx.world

    @property
    def train_cfg(self) -> TrainConfig:
        return self.prepared.train_cfg or self.cfg.train

    @property
    def method(self) -> str:
        """full or lora: --method, or what the task trains by default (full for an encoder, LoRA for a causal LM)."""
        return self.task.supports.default_method if self.cfg.train.method == "auto" else self.cfg.train.method

    @property
    def lora(self) -> bool:
        return self.method == "lora"

    @property
    def default_learning_rate(self) -> float:
        t = self.train_cfg
        return (t.lora_learning_rate or t.learning_rate * 10) if self.lora else t.learning_rate

    @property
    def learning_rate(self) -> float:
        """The fine-tune's rate: the search's winner once it ran (the learning curve reuses it), else the default."""
        return self.rates.get("fine_tuned", self.default_learning_rate)

    def add(self, rung: Rung, **extra) -> dict:
        """The rung's report row, added to the ladder (its bootstrap draws kept for the verdict)."""
        s = rung.scored
        row = {"name": rung.name, "description": rung.description, **s.fields, "train_examples": int(rung.train_examples),
               "train_seconds": round(float(rung.train_seconds), 3), **s.extra, **extra}
        self.ladder.append(row)
        self.boots[rung.name] = s.boot
        return row


def _start(cfg: RunConfig, command: str) -> _Run:
    """Pick the task kind and check what it supports, load the data (input problems stop the run before any folder is
    created), then open the run folder (rank 0 writes; every rank reads rank 0's checkpoints)."""
    import torch
    from transformers.utils import logging as hf_logging

    from fmtune import tasks
    from fmtune.models import loading
    from fmtune.training import distributed

    hf_logging.disable_progress_bar()  # fmtune shows its own progress
    hf_logging.set_verbosity_error()
    task_kind = tasks.for_config(cfg)
    primary = task_kind.primary_metric(cfg)
    check_supported(task_kind, cfg, distributed.world())
    _note_unused_settings(cfg, task_kind)
    device = loading.default_device()
    world = distributed.init(device.type)
    started, wall_start, io_start = datetime.now(timezone.utc), time.perf_counter(), disk_io()
    if world.distributed and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    ctx = Context(cfg, device, world, primary)
    if cfg.track:
        from fmtune.store import tracking

        tracking.check_available(cfg.track)
    task = task_kind()
    task.load(ctx)
    compared = _read_compared(cfg, task)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    out, tmp = _open_folder(cfg, world, task_kind.supports.resume)
    ctx.tmp = tmp
    name = cfg.name or out.name
    if world.main:
        record(out, name, "running", work_dir=tmp)
    return _Run(cfg, command, task, ctx, started, wall_start, io_start, out, tmp, name, compared=compared)


def _tensorboard(r: _Run, report: dict) -> None:
    """--track tensorboard: event files in the run folder (written before its manifest, so they are covered)."""
    if "tensorboard" not in r.cfg.track:
        return
    from fmtune.store import tracking

    written = tracking.to_tensorboard(r.tmp / "tensorboard", report, r.cfg.model_dump(mode="json"))
    report["tracking"] = {**report.get("tracking", {}), "tensorboard": {"log_dir": "tensorboard", "files": written["files"]}}


def _mlflow(r: _Run, report: dict) -> None:
    """--track mlflow, once the run folder is complete: a tracker that cannot be reached never costs the run."""
    if "mlflow" not in r.cfg.track:
        return
    from fmtune.store import tracking

    try:
        sent = tracking.to_mlflow(r.out, report, r.cfg.model_dump(mode="json"))
    except Exception as exc:  # noqa: BLE001 - the run is complete and recorded; only the copy to the tracker failed
        console.print(f"[yellow]warning:[/] could not send the run to MLflow ({tracking.without_credentials(str(exc))}); the run is complete. "
                      f"Send it later with: fmtune runs export {r.out} --to mlflow")
        return
    console.print(f"  tracked: {tracking.summary({'mlflow': sent})}")


def _read_compared(cfg: RunConfig, task) -> list:
    from fmtune.data import external

    generation = task.supports.kind == "generation"
    return [external.read_outputs(name, Path(path), task.test_inputs, generation, cfg.data) for name, path in cfg.eval.compare.items()]


def raise_if_gate_failed(report: dict, out: Path) -> None:
    """After the summary is printed: GateFailed (exit 3) when the run failed a gate the user set (--max-forgetting)."""
    from fmtune.evidence import retention

    gates = report["verdict"].get("gates") or {}
    if not gates.get("passed", True):
        raise GateFailed(retention.gate_failure(report["retention"], gates["max_forgetting"], out))


def _note_unused_settings(cfg: RunConfig, task_kind) -> None:
    s = task_kind.supports
    lora = (s.default_method if cfg.train.method == "auto" else cfg.train.method) == "lora"
    if cfg.train.head_learning_rate and (not s.new_head or lora):
        console.print("[yellow]note:[/] --head-learning-rate applies to full fine-tuning of an encoder classifier (its new head); this run "
                      + ("uses LoRA, whose head trains at the LoRA rate" if s.new_head else "trains a causal LM, which answers with the label word and has no new head")
                      + ", so it is not used.")


def _open_folder(cfg: RunConfig, world, resumable: bool) -> tuple[Path, Path]:
    out = tmp = None
    if world.main:
        out, tmp, resuming = open_run_dir(cfg, run_name(cfg))
        if resuming and resumable:
            console.print(f"[cyan]Resuming the unfinished run in {tmp}[/] (finished rungs are reused; training continues from the last checkpoint).")
            (tmp / "STATUS").unlink(missing_ok=True)
        elif resuming:  # an unfinished run of this configuration (its config.yaml matched) whose task keeps no checkpoints
            console.print(f"[yellow]note:[/] {tmp} holds an unfinished run of this configuration; this task kind keeps no checkpoints, so it starts again from the beginning.")
            shutil.rmtree(tmp)
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
    """The task encodes and audits its data and makes its choices; the test split's bootstrap draws."""
    from fmtune.evidence.evaluate import bootstrap_indices

    r.prepared = r.task.prepare(r.ctx)
    r.ctx.boot = bootstrap_indices(r.prepared.counts["test"], r.cfg.eval.bootstrap, r.cfg.seed)


def _no_training_rungs(r: _Run) -> None:
    for name, score in r.task.no_training_rungs(r.ctx).items():
        with stage(f"rung {name}", r.ctx.profile):
            r.add(score())


def _compared_rungs(r: _Run) -> None:
    """Other models' outputs (--compare) as rungs: scored on the same test examples and resamples, so they pair."""
    for c in r.compared:
        with stage(f"rung {c.name} (outputs from {c.path.name})", r.ctx.profile):
            scored = r.task.score_outputs(r.ctx, c.outputs)
            r.add(Rung(c.name, f"another model's outputs on the test inputs, read from {c.path.name} (trained elsewhere: no cost measured here)", scored, 0),
                  external={"file": str(c.path), "sha256": c.sha256, "rows": c.rows, "rows_not_in_test": c.ignored})


def _trained_rungs(r: _Run):
    """fine_tuned (full or LoRA) and from_scratch, each at the rate its search chose, with the choices the fine-tune
    made. Returns the fine-tune's TrainResult."""
    t = r.train_cfg
    with stage(f"rung fine_tuned ({r.method})", r.ctx.profile):
        ft, scored, n, found = _searched_rung(r, "fine-tuning", "fine_tuned", False, r.default_learning_rate, r.lora, lr_given(t, r.lora, False))
        row = r.add(Rung("fine_tuned", r.task.describe("fine_tuned", ft, r.method, r.learning_rate), scored, n, ft.train_seconds), history=ft.history, best_epoch=ft.best_epoch,
                    stopped=ft.stopped, learning_rate=r.learning_rate, method=r.method, still_improving=still_improving(ft, t), learned=ft.learned,
                    selection=ft.selection, search=found)
        if r.world.main:
            (r.tmp / "logs" / "history_fine_tuned.jsonl").write_text("".join(json.dumps(h) + "\n" for h in ft.history))
    rule = ft.selection["rule"] if ft.selection else r.task.selection
    r.ctx.choose("epochs", ft.best_epoch, f"{ft.stopped}; best {rule} at epoch {ft.best_epoch} (max {t.epochs}, patience {t.patience})"
                 + (undertrained_caveat(t) if row["still_improving"] else ""))
    r.ctx.choose("learning_rate", r.learning_rate, learning_rate_why(t, r.lora, found))
    row.update(r.task.tuning_choices(r.ctx, r.lora, r.learning_rate))  # e.g. the new head's learning rate
    if "from_scratch" in r.cfg.eval.rungs:
        r.ctx.scratch_epochs, why = scratch_budget(t, ft.epochs_run)
        r.ctx.choose("from_scratch_epochs", r.ctx.scratch_epochs, why)
        with stage("rung from_scratch", r.ctx.profile):
            sc, scored, n, found = _searched_rung(r, "from scratch", "from_scratch", True, t.scratch_learning_rate, False, lr_given(t, False, True))
            r.add(Rung("from_scratch", r.task.describe("from_scratch", sc, "full", r.rates["from_scratch"]), scored, n, sc.train_seconds), history=sc.history, best_epoch=sc.best_epoch,
                  stopped=sc.stopped, learning_rate=r.rates["from_scratch"], learned=sc.learned, search=found)
            del sc
    return ft


def _searched_rung(r: _Run, label: str, key: str, from_scratch: bool, default_lr: float, lora: bool, given: bool):
    """A trained rung at the rate its search picked on validation (fmtune.runner.search; one trial when --search off or
    the rate was given), scored on test once: (TrainResult, Scored, training examples, the search block)."""
    from fmtune.runner import search

    reused = _finished_rung(r, label, key, from_scratch)
    if reused is not None:
        result, scored, n, info = reused
        r.rates[key] = info.get("learning_rate", default_lr)
        return result, scored, n, info.get("search")
    n_train = len(r.prepared.strata)
    plan = search.plan(r.cfg, r.task.model_kind, n_train, default_lr, from_scratch, given)
    fit = functools.partial(_trial, r, label, key, from_scratch, lora, plan.searching)
    result, rate = search.run(plan, fit, r.task.epoch_score, r.task.min_epochs(n_train))
    r.rates[key] = rate
    rule = result.selection["rule"] if result.selection else r.task.selection
    found = search.summary(plan, rate, rule, _noise_words(result.selection)) if plan.searching else {"rates": plan.rates, "why": plan.why}
    scored = r.task.score(r.ctx, key, result.model)
    _mark_rung_done(r, key, result, scored, {"learning_rate": rate, "search": found})
    return result, scored, n_train, found


def _trial(r: _Run, label: str, key: str, from_scratch: bool, lora: bool, searching: bool, rate: float, on_epoch):
    """One trial of a rung's search: trained, or replayed from an interrupted run (its history through `on_epoch`, so
    the pruner decides as it did). Returns its TrainResult (without a model when replayed); a pruned trial raises."""
    from fmtune.training import checkpoint, train

    ckpt = r.tmp / "checkpoints" / (f"{key}-lr{rate:g}" if searching else key)
    done = checkpoint.load_done(ckpt) if searching and on_epoch is not None and r.task.supports.resume else None
    if done is not None:
        info = done[0]
        for row in info["history"]:
            on_epoch(row)  # raises TrialPruned again for a trial that was pruned
        console.print(f"  {label} at lr {rate:g}: reusing the finished trial from the interrupted run")
        return train.TrainResult(None, **{k: v for k, v in info.items() if k != "pruned"})
    rows: list[dict] = []

    def epoch_end(row: dict) -> None:
        rows.append(row)
        if on_epoch is not None:
            on_epoch(row)

    r.ctx.on_epoch = epoch_end
    try:
        result, _ = r.task.fit(r.ctx, f"{label} lr {rate:g}" if searching else label, None, from_scratch, rate, lora, ckpt if r.task.supports.resume else None)
    except BaseException as exc:
        if searching and type(exc).__name__ == "TrialPruned" and r.world.main:
            console.print(f"  {label} at lr {rate:g}: pruned after epoch {len(rows)} (its best validation score is behind the earlier trials' median there)")
        if searching and type(exc).__name__ == "TrialPruned" and r.world.main and r.task.supports.resume:
            checkpoint.mark_done(ckpt, None, {"pruned": True, "history": rows, "best_epoch": 0, "epochs_run": len(rows), "steps": 0, "train_seconds": 0.0, "stopped": "pruned"})
        raise
    finally:
        r.ctx.on_epoch = None
    if searching and r.world.main and r.task.supports.resume:
        checkpoint.mark_done(ckpt, None, _result_info(result))
    return result


def _noise_words(selection: dict | None) -> str | None:
    if not selection or "validation_macro_f1_ci95" not in selection:
        return None
    lo, hi = selection["validation_macro_f1_ci95"]
    return (f"The validation split has {selection['validation_examples']} examples: the winner's validation macro-F1 {selection['validation_macro_f1']:.3f} "
            f"has a 95% interval of {lo:.3f} to {hi:.3f}, so rates whose scores differ by less than that are not reliably ranked")


def _fit_rung(r: _Run, label: str, key: str, subset: np.ndarray | None, from_scratch: bool, lr: float, lora: bool):
    """Train one rung at a given rate (a learning-curve point), or reuse it, finished, from an interrupted run, and score
    it on the test split: (TrainResult, Scored, training examples)."""
    reused = _finished_rung(r, label, key, from_scratch)
    if reused is not None:
        return reused[0], reused[1], len(r.prepared.strata) if subset is None else len(subset)
    ckpt = r.tmp / "checkpoints" / key
    result, n = r.task.fit(r.ctx, label, subset, from_scratch, lr, lora, ckpt if r.task.supports.resume else None)
    scored = r.task.score(r.ctx, key, result.model)
    _mark_rung_done(r, key, result, scored, {})
    return result, scored, n


def _finished_rung(r: _Run, label: str, key: str, from_scratch: bool):
    """A rung that finished before an interruption: (TrainResult, Scored, training examples, its extra info), or None."""
    from fmtune.training import checkpoint, train

    finished = checkpoint.load_done(r.tmp / "checkpoints" / key) if r.task.supports.resume else None
    if finished is None:
        return None
    info, weights = finished
    saved = info.pop("scored", None)
    extra = {k: info.pop(k) for k in ("learning_rate", "search") if k in info}
    model = r.task.restore(r.ctx, weights, from_scratch) if weights is not None or saved is None else None
    console.print(f"  {label}: reusing the finished rung from the interrupted run")
    result = train.TrainResult(model, **info)
    scored = Scored.from_json(saved) if saved is not None else r.task.score(r.ctx, key, model)
    return result, scored, len(r.prepared.strata), extra


def _result_info(result) -> dict:
    return {k: getattr(result, k) for k in ("history", "best_epoch", "epochs_run", "steps", "train_seconds", "stopped", "levers", "real_tokens", "learned", "selection")}


def _mark_rung_done(r: _Run, key: str, result, scored: Scored, extra: dict) -> None:
    """Rank 0 records a finished rung for --resume; only the fine-tune keeps its model (saved, probed and timed later),
    the other rungs keep their score. The fine-tune's LoRA adapter is written now: a resumed run reuses the model."""
    from fmtune.training import checkpoint

    if not r.world.main:
        return
    keep_model = key == "fine_tuned"
    if keep_model and result.adapter is not None:
        _save_adapter(result.adapter, r.tmp / "adapter")
    if r.task.supports.resume:
        info = {**_result_info(result), **extra}
        checkpoint.mark_done(r.tmp / "checkpoints" / key, result.model if keep_model else None, info if keep_model else {**info, "scored": scored.to_json()})


def _save_adapter(adapter: dict, folder: Path) -> None:
    from safetensors.torch import save_file

    adapter["config"].save_pretrained(folder)
    save_file(adapter["state"], str(folder / "adapter_model.safetensors"))


def _learning_curve(r: _Run, ft) -> tuple[dict, float]:
    """The fine-tune on nested subsets of the training data (stratified as the task says), plus the full run as the last
    point, with a forecast."""
    from fmtune.evidence import learning_curve

    primary = r.ctx.primary
    if not r.cfg.evidence.curve:
        return {"metric": primary, "points": [], "skipped": "turned off with --no-curve"}, 0.0
    ft_row = next(row for row in r.ladder if row["name"] == "fine_tuned")
    seconds, points, curve_boots = 0.0, [], []
    with stage("learning curve", r.ctx.profile):
        for frac, subset in learning_curve.nested_subsets(r.prepared.strata, r.cfg.evidence.curve_fractions, r.cfg.seed).items():
            res, scored, n = _fit_rung(r, f"curve {frac:.1%}", f"curve-{frac:g}", subset, False, r.learning_rate, r.lora)
            seconds += res.train_seconds
            points.append({"fraction": frac, "train_examples": n, "metric": scored.fields["metrics"][primary], "ci95": scored.fields["ci95"][primary],
                           "train_seconds": round(float(res.train_seconds), 3), "epochs": res.epochs_run})
            curve_boots.append(scored.boot)
            del res
        points.append({"fraction": 1.0, "train_examples": ft_row["train_examples"], "metric": ft_row["metrics"][primary], "ci95": ft_row["ci95"][primary],
                       "train_seconds": ft_row["train_seconds"], "epochs": ft.epochs_run})
        curve_boots.append(r.boots["fine_tuned"])
    return {"metric": primary, "points": points, "forecast": learning_curve.forecast(points, curve_boots, r.cfg.evidence.target_metric)}, seconds


def _save_and_measure(r: _Run, ft) -> dict:
    """The model folder, then size and latency of the base and the tuned model on the same inputs (the `inference` block)."""
    with stage("save model", r.ctx.profile):
        model_dir = r.tmp / "model"
        r.task.save(r.ctx, ft.model, model_dir)
    with stage(f"measure {r.task.measures}", r.ctx.profile):
        return r.task.measure(r.ctx, ft.model, model_dir, r.lora)


def _report(r: _Run, ft, curve: dict, curve_seconds: float, retention_: dict, shift: dict, inf: dict) -> dict:
    """The report.json dict (contract: shared/report.schema.json), cost and verdict included."""
    from fmtune.evidence import inference, retention, verdict
    from fmtune.models import loading

    cfg, p, kind = r.cfg, r.prepared, r.task.supports.kind
    cost_ = verdict.cost(r.ladder, loading.hardware_description(), os.cpu_count() or 1, cfg.evidence.price_per_hour, curve_seconds, kind)
    if "per_request" in inf:
        cost_.update(verdict.break_even(cost_, inf["per_request"]))
    verdict_ = verdict.verdict(r.ladder, r.boots, r.ctx.primary, retention_, p.audit, curve, cost_, p.counts["test"])
    verdict_["gates"] = retention.gate(retention_, cfg.evidence.max_forgetting)
    data = {**p.counts, "sha256": p.splits.sha256, "files": p.splits.files, "dropped": p.splits.dropped}
    if p.truncated is not None:
        data["truncated"] = p.truncated
    report = {
        "fmtune_version": __version__,
        "run": {"name": r.name, "status": "complete", "started_at": r.started.isoformat(timespec="seconds"), "finished_at": None,
                "wall_seconds": None, "seed": cfg.seed, "command": r.command, "stages": stage_lines(r.ctx.profile), "profile": r.ctx.profile},
        "task": {"type": kind, "primary_metric": r.ctx.primary, **p.task_block},
        "data": {**data, "audit": p.audit},
        "base_model": {"name": p.model_name, "path": str(p.model_path), "parameters": inference.count_parameters(p.base),
                       "sha256": loading.weights_hash(p.model_path), "architecture": type(p.base).__name__, "max_length": p.max_length},
        "choices": r.ctx.choices,
        "levers": {**ft.levers, **r.task.levers()},
        "ladder": r.ladder,
        "retention": retention_,
        "domain_shift": shift,
        "learning_curve": curve,
        "cost": cost_,
        "inference": inf,
        "verdict": verdict_,
    }
    skipped = r.task.skipped_rungs(cfg)
    if skipped is not None:
        report["skipped_rungs"] = skipped
    return report


def scratch_budget(train, ft_epochs: int) -> tuple[int, str]:
    """from_scratch's epoch limit (each trial of its search, too): the epochs the fine-tune ran, times --scratch-budget."""
    epochs = max(1, round(ft_epochs * train.scratch_budget))
    if train.scratch_budget == 1:
        return epochs, (f"the epochs the fine-tune ran ({ft_epochs}): same data and batch size, so the same optimizer steps; "
                        "early stopping may end it sooner (--scratch-budget gives it more, at its cost)")
    return epochs, (f"--scratch-budget {train.scratch_budget:g}: {train.scratch_budget:g} x the {ft_epochs} epochs the fine-tune ran, a larger budget "
                    "than the fine-tune had (the from_scratch rung's train_seconds say what it cost)")


def still_improving(result, train) -> bool:
    """Whether training ran out of epochs while validation was still getting better (best epoch = the last allowed)."""
    return result.epochs_run >= train.epochs and result.best_epoch == result.epochs_run


def undertrained_caveat(train) -> str:
    return (f"; validation was still improving at the last epoch, so the model is probably undertrained: "
            f"raise --epochs (now {train.epochs}) or --learning-rate (now {train.learning_rate:g})")


def lr_given(train, lora: bool, from_scratch: bool) -> bool:
    """Whether the user set the rung's learning rate (then it is not searched)."""
    given = train.model_fields_set
    if from_scratch:
        return "scratch_learning_rate" in given
    return (train.lora_learning_rate is not None or "learning_rate" in given) if lora else "learning_rate" in given


def learning_rate_why(train, lora: bool, found: dict | None = None) -> str:
    """Where the fine-tune's learning rate came from: the search, a flag, or the default (LoRA: 10x the full rate)."""
    if found and "winner_why" in found:
        return f"searched on validation ({found['why']}): {found['winner_why']}"
    if lora and train.lora_learning_rate:
        return "--lora-learning-rate"
    default = TrainConfig.model_fields["learning_rate"].default
    given = "--learning-rate" if "learning_rate" in train.model_fields_set else f"default ({default:g}, the usual peak rate for fine-tuning a pre-trained model; set --learning-rate)"
    why = f"LoRA: 10x the fine-tuning rate, {given}" if lora else given
    return why + (f"; {found['why']}" if found and found.get("why") else "")
