"""The budgeted search of a trained rung's learning rate, on the validation split only (never test): trials of the
task's fit at rates around the rung's default, each one ended early by Optuna's median pruner once its best
validation score so far falls behind the median of the earlier trials at the same epoch. The winner is the trial with
the best validation score (the score early stopping selects on); its model is the rung, so the search costs the extra
trials and nothing more. The learning curve's subsets reuse the winner's rate."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

from fmtune.config import RunConfig
from fmtune.errors import ConfigError

# rates tried, as multiples of the rung's default: with fine-tuning's 5e-5 these are the grid Hugging Face users
# search by hand (2e-5, 5e-5, 1e-4, 2e-4); from_scratch's random init trains best higher, around its own 3e-4
FINE_TUNE_MULTIPLIERS = (1.0, 0.4, 2.0, 4.0)
SCRATCH_MULTIPLIERS = (1.0, 1 / 3, 10 / 3)
AUTO_TRIALS = {"encoder": 4, "causal": 3}  # --search auto: trials of the fine_tuned rung by model kind (a causal LM's trial costs more)
AUTO_SCRATCH_TRIALS = {"encoder": 3, "causal": 2}
LARGE_TRAIN = 20_000  # --search auto: above this many training examples, one trial fewer (each costs more, and the default is safer)


@dataclass
class Trial:
    """One trial of the search as the report shows it."""

    learning_rate: float
    state: str  # "complete" or "pruned"
    epochs: int
    best_epoch: int
    score: float  # the best validation score (higher is better: macro-F1, or minus the validation loss)
    seconds: float

    def to_json(self, rule: str) -> dict:
        """The trial as the report shows it, its score under the rule's own name and sign (a loss: lower is better)."""
        value = -self.score if "loss" in rule else self.score
        return {"learning_rate": self.learning_rate, "state": self.state, "epochs": self.epochs, "best_epoch": self.best_epoch,
                rule_key(rule): round(value, 5), "seconds": round(self.seconds, 2)}


def rule_key(rule: str) -> str:
    """'calibrated validation loss' -> 'calibrated_validation_loss', 'validation macro-F1' -> 'validation_macro_f1'."""
    return rule.replace(" ", "_").replace("-", "_").lower()


@dataclass
class Plan:
    """The rates a rung tries, first the default, and why that many."""

    rates: list[float]
    why: str
    trials: list[Trial] = field(default_factory=list)

    @property
    def searching(self) -> bool:
        return len(self.rates) > 1


def parse(value: str) -> int | None:
    """--search: 'off' (1 trial), 'auto' (None: by the data and the model) or N trials."""
    if value == "off":
        return 1
    if value == "auto":
        return None
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise ConfigError(f"--search {value}: expected off, auto or a number of trials (1 or more).")


def plan(cfg: RunConfig, model_kind: str, n_train: int, default_lr: float, from_scratch: bool, given: bool) -> Plan:
    """The rates to try for one rung. A learning rate the user set (`given`) is not searched."""
    wanted = parse(str(cfg.train.search))
    name = "from_scratch" if from_scratch else "fine_tuned"
    if given:
        return Plan([default_lr], "set by the user: not searched")
    if wanted is None:
        table = AUTO_SCRATCH_TRIALS if from_scratch else AUTO_TRIALS
        wanted = table[model_kind] - (1 if n_train > LARGE_TRAIN else 0)
        why = (f"--search auto: {wanted} trials for the {name} rung of a{'n' if model_kind == 'encoder' else ''} {model_kind} model"
               + (f" ({n_train} training examples, over {LARGE_TRAIN}: one trial fewer)" if n_train > LARGE_TRAIN else f" with {n_train} training examples"))
    else:
        why = f"--search {cfg.train.search}" if wanted > 1 else "--search off: the default rate only"
    multipliers = SCRATCH_MULTIPLIERS if from_scratch else FINE_TUNE_MULTIPLIERS
    if wanted <= len(multipliers):
        rates = [default_lr * m for m in multipliers[:wanted]]
    else:  # more trials than the grid: log-spaced over the grid's range, the default first
        lo, hi = min(multipliers), max(multipliers)
        rates = [default_lr] + [default_lr * lo * (hi / lo) ** (i / (wanted - 2)) for i in range(wanted - 1)]
    return Plan([float(f"{r:.3g}") for r in rates], why)


def run(p: Plan, fit: Callable[[float, Callable[[dict], None] | None], object], score: Callable[[dict], float], min_epochs: int) -> tuple[object, float]:
    """Run the plan's trials in order; returns (the winning trial's result, its rate). `fit(rate, on_epoch)` trains a
    trial and returns its TrainResult (None for a trial finished in an interrupted run whose weights were not kept:
    it is trained again if it wins); `score(history row)` is the validation score the loop selects on."""
    if not p.searching:
        return fit(p.rates[0], None), p.rates[0]
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=min_epochs))
    best, best_rate, best_score = None, p.rates[0], -math.inf
    for rate in p.rates:  # in the plan's order, the default first: it is the reference the pruner compares with
        study.enqueue_trial({"learning_rate": rate})
        trial = study.ask()
        trial.suggest_categorical("learning_rate", p.rates)
        start, rows = time.perf_counter(), []

        def on_epoch(row: dict, trial=trial, rows=rows) -> None:
            rows.append(row)
            trial.report(max(score(r) for r in rows), row["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned()

        try:
            result = fit(rate, on_epoch)
        except optuna.TrialPruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            p.trials.append(Trial(rate, "pruned", len(rows), _best_epoch(rows, score), max(score(r) for r in rows), time.perf_counter() - start))
            continue
        history = result.history if result is not None else rows
        value = max(score(r) for r in history)
        study.tell(trial, value)
        p.trials.append(Trial(rate, "complete", len(history), _best_epoch(history, score), value, time.perf_counter() - start))
        if value > best_score:
            best, best_rate, best_score = result, rate, value
    if best is None or getattr(best, "model", True) is None:  # the winner was replayed from an interrupted run without its weights:
        best = fit(best_rate, None)  # train it again (same seed, same result)
    return best, best_rate


def _best_epoch(rows: list[dict], score: Callable[[dict], float]) -> int:
    return max(rows, key=score)["epoch"] if rows else 0


def summary(p: Plan, rate: float, rule: str, noise: str | None) -> dict:
    """The report's block: every trial, the winner and why it won."""
    trials = [t.to_json(rule) for t in p.trials]
    out = {"rates": p.rates, "why": p.why, "selection": rule, "trials": trials, "winner": rate}
    done = [t for t in p.trials if t.state == "complete"]
    if len(done) > 1:
        ranked = sorted(done, key=lambda t: t.score, reverse=True)
        win, second = ranked[0], ranked[1]
        fmt = (lambda s: f"{-s:.4f}") if "loss" in rule else (lambda s: f"{s:.4f}")
        out["winner_why"] = (f"learning rate {win.learning_rate:g} has the best {rule} ({fmt(win.score)}; next {second.learning_rate:g} with {fmt(second.score)})"
                             + (f"; {sum(t.state == 'pruned' for t in p.trials)} trial(s) pruned for falling behind the median of earlier trials" if any(t.state == "pruned" for t in p.trials) else "")
                             + (f". {noise}" if noise else ""))
    return out
