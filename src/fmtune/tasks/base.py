"""The shape every task kind has, and what it hands back to the runner: the choices it made, its prepared data, the rungs
it scored. Tasks return data; only the runner writes report keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from fmtune.config import RunConfig
from fmtune.errors import ConfigError, FmtuneError


@dataclass(frozen=True)
class Supports:
    """What a task kind can do, checked once against the config before anything runs (check_supported)."""

    kind: str  # the report's task.type: "classification" or "generation"
    default_method: str  # what --method auto trains: "full" or "lora"
    resume: bool = True  # finished rungs reused and training continued from checkpoints after an interruption
    distributed: bool = True  # training in several processes (--nproc, torchrun, accelerate launch)
    fsdp: bool = True  # --distributed fsdp (sharded parameters); else DDP only
    new_head: bool = False  # fine-tuning adds parameters the base model lacks (a classifier head): --head-learning-rate applies
    no_training_rungs: tuple[str, ...] = ("zero_shot", "few_shot")  # the rungs run without training, in ladder order


@dataclass
class Context:
    """What the runner shares with a task: the config, the stage log, where the run lives, the test bootstrap draws
    (once the test split is known) and the list of choices, each with why."""

    cfg: RunConfig
    device: Any
    world: Any
    primary: str
    tmp: Path | None = None
    boot: np.ndarray | None = None
    choices: list[dict] = field(default_factory=list)
    profile: list[dict] = field(default_factory=list)  # the stage log: each stage's seconds, CPU seconds, bytes written, peak memory (console.stage)
    on_epoch: Callable[[dict], None] | None = None  # the runner's hook at each epoch's end (the search's pruner); tasks call epoch_end
    scratch_epochs: int | None = None  # from_scratch's epoch limit once the fine-tune ran: its epochs, so both get the same optimizer steps

    def train_settings(self, train, from_scratch: bool):
        """The training settings of one rung: from_scratch gets the epoch limit the runner set once the fine-tune ran
        (pipeline.scratch_budget: by default the fine-tune's epochs, i.e. the same optimizer steps)."""
        if from_scratch and self.scratch_epochs is not None:
            return train.model_copy(update={"epochs": self.scratch_epochs})
        return train

    def epoch_end(self, row: dict) -> None:
        """A trained rung's history row, as each epoch ends: passed to the runner's hook, if any."""
        if self.on_epoch is not None:
            self.on_epoch(row)

    @property
    def seed(self) -> int:
        return self.cfg.seed

    def choose(self, setting: str, value: Any, why: str) -> None:
        self.choices.append({"setting": setting, "value": value, "why": why})


@dataclass
class Prepared:
    """What a task's data and base model look like once loaded, audited and encoded (the report's data, task and
    base_model blocks are built from it)."""

    splits: Any  # has sha256, files, dropped
    counts: dict[str, int]  # examples per split
    audit: dict
    base: Any  # the base model
    model_path: Path
    model_name: str
    max_length: int
    strata: np.ndarray  # the learning curve's subsets are stratified by these (labels, or zeros)
    task_block: dict  # the report's task block, primary_metric and type excepted
    truncated: dict | None = None
    train_cfg: Any = None  # the training settings used (the task may derive some from the data, e.g. the epoch limit)


@dataclass
class Scored:
    """A model's test-split score: the metrics, their 95% CIs (and per-class rows for classification), the primary
    metric's bootstrap draws for paired comparisons, and the extra fields of its rung (eval seconds, calibration ...)."""

    fields: dict
    boot: np.ndarray
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"fields": self.fields, "boot": np.asarray(self.boot).tolist(), "extra": self.extra}

    @classmethod
    def from_json(cls, d: dict) -> "Scored":
        return cls(d["fields"], np.asarray(d["boot"]), d.get("extra", {}))


@dataclass
class Rung:
    """One scored rung of the ladder, as the task hands it to the runner."""

    name: str
    description: str
    scored: Scored
    train_examples: int
    train_seconds: float = 0.0


class Task(Protocol):
    """One task kind (encoder classification, LM classification, generation). The runner calls, in order: load,
    prepare, no_training_rungs, then fit and score for every trained rung and curve point, probes, save, measure."""

    supports: Supports
    model_kind: str  # "encoder" or "causal": what the search's budget and rates are sized for
    test_inputs: list[str]  # the test split's inputs as given (before redaction): what --compare files are matched on

    @staticmethod
    def primary_metric(cfg: RunConfig) -> str: ...
    def load(self, ctx: Context) -> None: ...  # data and tokenizer: input problems stop the run before a folder exists
    def prepare(self, ctx: Context) -> Prepared: ...
    def no_training_rungs(self, ctx: Context) -> dict[str, Callable[[], Rung]]: ...  # run lazily, each in its stage
    def fit(self, ctx: Context, label: str, subset: np.ndarray | None, from_scratch: bool, lr: float, lora: bool, checkpoint_dir: Path | None): ...
    def restore(self, ctx: Context, weights: dict | None, from_scratch: bool) -> Any: ...  # a finished rung's model from its checkpoint
    def score(self, ctx: Context, rung: str, model) -> Scored: ...
    def describe(self, rung: str, result, method: str, lr: float) -> str: ...
    def epoch_score(self, row: dict) -> float: ...  # the validation score a history row was selected on (higher is better)
    def min_epochs(self, n_train: int) -> int: ...  # the epoch from which early stopping (and the search's pruner) may end a rung
    def score_outputs(self, ctx: Context, outputs: list[str]) -> Scored: ...  # another model's outputs on the test inputs (--compare)
    def probes(self, ctx: Context, tuned) -> tuple[dict, dict]: ...
    def save(self, ctx: Context, tuned, model_dir: Path) -> None: ...
    def measure(self, ctx: Context, tuned, model_dir: Path, lora: bool) -> dict: ...


def scored_label_outputs(ctx: Context, outputs: list[str], labels: list[str], y_test: np.ndarray) -> Scored:
    """Another model's labels for the test texts, scored like a rung; a label outside the label set counts as wrong."""
    from fmtune.evidence.evaluate import classification_metrics

    index = {label: i for i, label in enumerate(labels)}
    predictions = np.array([index.get(o.strip(), -1) for o in outputs], dtype=np.int64)
    m = classification_metrics(y_test, predictions, labels, ctx.boot, ctx.primary)
    return Scored(m, m.pop("_boot_primary"), {"outputs_outside_label_set": int((predictions < 0).sum())})


def check_supported(task: type, cfg: RunConfig, world) -> None:
    """What the task kind cannot do, said once, before anything starts."""
    s: Supports = task.supports
    if world.distributed and not s.distributed:
        raise FmtuneError(f"{task.__name__} runs train in one process: multi-process training (--nproc, torchrun, accelerate launch) is not supported for them. "
                          "Fix: run the same command without --nproc / the launcher.")
    if world.distributed and cfg.train.distributed == "fsdp" and not s.fsdp:
        raise FmtuneError(f"--distributed fsdp: {task.__name__} runs train under DDP only (the loss calls the decoder and the output layer "
                          "directly, outside FSDP's root module). Fix: --distributed ddp, or --method lora to fit a larger model per process.")
    if not set(s.no_training_rungs) & set(cfg.eval.rungs):
        raise ConfigError(f"--rungs {','.join(cfg.eval.rungs)}: the verdict compares fine_tuned with a rung that needs no training; include "
                          f"{' or '.join(s.no_training_rungs)}" + ("" if "head_only" in s.no_training_rungs else
                          " (head_only, a linear head on a frozen encoder's embeddings, does not apply to a causal LM)") + ".")


def scratch_words(result) -> str:
    """How the from_scratch rung's budget compares with the fine-tune's, for its description."""
    return f"same architecture, random init, same data; {result.epochs_run} epochs run (its limit: see the from_scratch_epochs choice)"
