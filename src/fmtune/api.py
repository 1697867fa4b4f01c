"""The Python API for notebooks and scripts: `fmtune.run(...)` climbs the evidence ladder and returns a typed result;
`fmtune.load(run_dir)` returns a predictor for any finished run.

`fmtune.run` takes the same options as `fmtune run` (flag names with underscores: `text_column="review"`, `epochs=4`,
`rungs=["zero_shot", "fine_tuned"]`), validates them the same way and keeps the same defaults, the thread choice
included. Stage lines and progress bars are records of the `fmtune` logger: with no handler of yours on it, they go
to stderr as in the CLI (and the ladder table to stdout); pass `quiet=True`, or set the logger above INFO
(`logging.getLogger("fmtune").setLevel(logging.WARNING)`), to silence them, or add your own handler to receive them
as plain text.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("fmtune")


@dataclass(frozen=True)
class Rung:
    """One rung of the ladder on the test split: its primary metric with a 95% bootstrap interval."""

    name: str
    value: float
    ci95: tuple[float, float]
    train_examples: int
    train_seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    """Whether fine-tuning is recommended, in plain words, and the paired gain over the best no-training rung."""

    recommend: bool
    headline: str
    baseline: str
    gain: float
    gain_ci95: tuple[float, float]
    reasons: list[str]


@dataclass(frozen=True)
class RunResult:
    """A finished run: where it is, what it measured (the ladder, the verdict) and the whole report."""

    run_dir: Path
    task: str
    primary_metric: str
    ladder: list[Rung]
    verdict: Verdict
    report: dict[str, Any]

    @property
    def report_html(self) -> Path:
        return self.run_dir / "report.html"

    @property
    def report_json(self) -> Path:
        return self.run_dir / "report.json"

    @property
    def model_dir(self) -> Path:
        return self.run_dir / "model"

    def rung(self, name: str) -> Rung:
        for r in self.ladder:
            if r.name == name:
                return r
        raise KeyError(f"no rung {name!r} in this run; rungs: {', '.join(r.name for r in self.ladder)}")

    @classmethod
    def from_folder(cls, run_dir: Path | str) -> "RunResult":
        """The result of a finished run folder (its report.json)."""
        run_dir = Path(run_dir)
        report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
        primary = report["task"]["primary_metric"]
        ladder = [Rung(r["name"], float(r["metrics"][primary]), tuple(r["ci95"][primary]), int(r["train_examples"]), float(r["train_seconds"]), dict(r["metrics"]))
                  for r in report["ladder"]]
        v = report["verdict"]
        verdict = Verdict(bool(v["recommend_fine_tuning"]), v["headline"], v["baseline"], float(v["gain"]), tuple(v["gain_ci95"]), list(v["reasons"]))
        return cls(run_dir, report["task"]["type"], primary, ladder, verdict, report)


def _silenced(quiet: bool) -> bool:
    return quiet or (log.level != logging.NOTSET and log.level > logging.INFO)


@contextlib.contextmanager
def _console(quiet: bool):
    """For one run: nothing shown when quiet; else, when nobody gave the "fmtune" logger a handler (or silenced it),
    the CLI's console handler on it (stage lines and progress bars on stderr, as in the CLI), taken off afterwards."""
    from fmtune.console import ConsoleHandler, console

    before = (console.quiet, log.level, log.propagate)
    console.quiet = before[0] or quiet
    handler = None
    if not _silenced(quiet) and not log.handlers:
        handler = ConsoleHandler()
        log.addHandler(handler)
        log.setLevel(log.level or logging.INFO)
        log.propagate = False  # not also to the root logger's handlers (a notebook's basicConfig would print it twice)
    try:
        yield
    finally:
        console.quiet = before[0]
        if handler is not None:
            log.removeHandler(handler)
            log.setLevel(before[1])
            log.propagate = before[2]


def _configure_threads() -> None:
    """The CLI's thread choice (fmtune.training.threads), made before torch starts its thread pool; once torch runs, its pool
    keeps the wait policy it started with, and the report's levers say which one that was."""
    from fmtune.training import threads

    if "torch" not in sys.modules:
        threads.configure()
    else:
        log.debug("torch was imported before fmtune.run: its threads keep their wait policy (see levers.threads in the report)")


def run(data: str | Path | None = None, *, config: str | Path | None = None, quiet: bool = False, **options: Any) -> RunResult:
    """Fine-tune and climb the evidence ladder; returns the finished run.

    `data` is one labeled file (split automatically) or pass `train=`, `test=` (and `validation=`). `config` is an
    optional grouped YAML file; `options` override it, with the names of `fmtune run`'s flags (`fmtune run --help`).
    Bad options raise fmtune.errors.ConfigError listing every problem; a run that completes but fails a gate you set
    (max_forgetting) raises fmtune.errors.GateFailed after its folder is written.
    """
    from fmtune.config import build_config, load_yaml
    from fmtune.runner.pipeline import run as run_pipeline

    _configure_threads()
    overrides = {k: v for k, v in options.items() if v is not None}
    if data is not None:
        overrides["data"] = data
    file_values = load_yaml(Path(config)) if config is not None else None
    cfg = build_config(file_values, overrides, source=str(config) if config is not None else "fmtune.run()")
    shown = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
    with _console(quiet):
        out = run_pipeline(cfg, command=f"fmtune.run({shown})", show_summary=not _silenced(quiet))
    return RunResult.from_folder(out)


def load(run_dir: str | Path, bf16: bool | None = None):
    """The fine-tuned model of a finished run, ready to use: `.predict(texts)` for a classification run (a list of
    {label, probabilities}), `.generate(prompts)` for a generation run (a list of answers)."""
    from fmtune.serving.predict import load_predictor

    return load_predictor(run_dir, bf16=bf16)
