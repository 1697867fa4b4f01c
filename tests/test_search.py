"""The learning-rate search of the trained rungs (fmtune.runner.search): its plan, trials chosen on validation only,
pruning, the winner used by the rung and the learning curve, and a resumed search ending where an uninterrupted one does."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fmtune.config import build_config
from fmtune.errors import ConfigError
from fmtune.runner import search

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_reviews, write_csv  # noqa: E402


def _cfg(tmp_path, **extra):
    (tmp_path / "d.csv").write_text("text,label\na,b\n")
    return build_config(None, {"data": tmp_path / "d.csv", **extra})


def test_plan_tries_the_default_first_then_the_usual_grid(tmp_path):
    auto = search.plan(_cfg(tmp_path, search="auto"), "encoder", 500, 5e-5, False, given=False)
    assert auto.rates == [5e-5, 2e-5, 1e-4, 2e-4] and "4 trials" in auto.why
    assert search.plan(_cfg(tmp_path, search="auto"), "causal", 500, 5e-4, False, given=False).rates == [5e-4, 2e-4, 1e-3]
    assert search.plan(_cfg(tmp_path, search="auto"), "encoder", 500, 3e-4, True, given=False).rates == [3e-4, 1e-4, 1e-3]
    assert len(search.plan(_cfg(tmp_path, search="auto"), "encoder", 50_000, 5e-5, False, given=False).rates) == 3
    off = search.plan(_cfg(tmp_path, search="off"), "encoder", 500, 5e-5, False, given=False)
    assert off.rates == [5e-5] and not off.searching
    six = search.plan(_cfg(tmp_path, search=6), "encoder", 500, 5e-5, False, given=False).rates
    assert len(six) == 6 and six[0] == 5e-5 and min(six) == pytest.approx(2e-5) and max(six) == pytest.approx(2e-4)
    given = search.plan(_cfg(tmp_path, search="auto", learning_rate=1e-4), "encoder", 500, 1e-4, False, given=True)
    assert given.rates == [1e-4] and "set by the user" in given.why


@pytest.mark.parametrize("value", ["sometimes", "0", "-2"])
def test_a_bad_search_value_names_the_flag(tmp_path, value):
    with pytest.raises(ConfigError, match="search"):
        _cfg(tmp_path, search=value)


def test_yaml_off_is_read_as_off(tmp_path):
    assert _cfg(tmp_path, search=False).train.search == "off"


def test_pruned_trials_stop_once_they_fall_behind_the_median():
    """A trial whose best validation score is below the earlier trials' median at an epoch past min_epochs is pruned there."""
    plan = search.Plan([1.0, 2.0, 3.0], "test")
    curves = {1.0: [0.5, 0.6, 0.7, 0.8], 2.0: [0.1, 0.1, 0.1, 0.1], 3.0: [0.6, 0.7, 0.8, 0.9]}

    class Result:
        def __init__(self, history):
            self.history = history

    def fit(rate, on_epoch):
        rows = []
        for epoch, value in enumerate(curves[rate], start=1):
            rows.append({"epoch": epoch, "score": value})
            if on_epoch:
                on_epoch(rows[-1])
        return Result(rows)

    best, rate = search.run(plan, fit, lambda row: row["score"], min_epochs=2)
    assert rate == 3.0 and best.history[-1]["score"] == 0.9
    states = {t.learning_rate: (t.state, t.epochs) for t in plan.trials}
    assert states == {1.0: ("complete", 4), 2.0: ("pruned", 2), 3.0: ("complete", 4)}
    block = search.summary(plan, rate, "validation macro-F1", None)
    assert "learning rate 3 has the best validation macro-F1 (0.9000; next 1 with 0.8000)" in block["winner_why"] and "1 trial(s) pruned" in block["winner_why"]


def _run(tmp_path, tiny_bert, out: str, **extra):
    from fmtune.runner.pipeline import run

    data = write_csv(tmp_path / "reviews.csv", make_reviews(160))
    cfg = build_config(None, {"data": data, "model": str(tiny_bert), "out": tmp_path / "runs" / out, "rungs": ["zero_shot", "fine_tuned", "from_scratch"],
                              "curve_fractions": [0.5], "epochs": 3, "batch_size": 16, "bootstrap": 100, "latency_repeats": 3, "threads": 1, "bf16": "off",
                              "search": "3", **extra})
    return json.loads((run(cfg, "test") / "report.json").read_text())


def test_a_run_searches_both_trained_rungs_on_validation_and_the_curve_reuses_the_winner(tmp_path, tiny_bert, monkeypatch):
    from fmtune.training import train

    seen = []  # (rate, splits the fit saw): the search must never train or select on the test split
    real_fit = train.fit
    monkeypatch.setattr(train, "fit", lambda model, tok, tr, va, cfg, **kw: seen.append((kw["learning_rate"], len(tr[1]), len(va[1]))) or real_fit(model, tok, tr, va, cfg, **kw))
    report = _run(tmp_path, tiny_bert, "searched")
    rows = {r["name"]: r for r in report["ladder"]}
    ft, scratch = rows["fine_tuned"], rows["from_scratch"]
    assert ft["search"]["rates"] == [5e-5, 2e-5, 1e-4] and [t["learning_rate"] for t in ft["search"]["trials"]] == [5e-5, 2e-5, 1e-4]
    assert ft["learning_rate"] == ft["search"]["winner"] and scratch["learning_rate"] == scratch["search"]["winner"]
    assert len(scratch["search"]["trials"]) == 3
    # the winner is the trial with the best validation score, and the rung's history is the winner's
    rule = ft["selection"]["rule"]
    key, field = search.rule_key(rule), {"validation macro-F1": "val_macro_f1", "calibrated validation loss": "val_calibrated_loss"}.get(rule, "val_loss")
    done = [t for t in ft["search"]["trials"] if t["state"] == "complete"]
    lower = "loss" in rule
    best = (min if lower else max)(done, key=lambda t: t[key])
    assert best["learning_rate"] == ft["learning_rate"]
    assert best[key] == pytest.approx((min if lower else max)(h[field] for h in ft["history"]), abs=1e-4)
    n_train, n_val = ft["train_examples"], report["data"]["validation"]
    fine_tunes = [s for s in seen if s[1] == n_train]
    assert all(v == n_val for _, _, v in seen), "every trial is selected on the validation split"
    assert len(fine_tunes) == len(ft["search"]["trials"]) + len(scratch["search"]["trials"])
    curve_rates = [rate for rate, n, _ in seen if n < n_train]
    assert curve_rates == [ft["learning_rate"]], "the learning curve's subsets reuse the winning rate"
    assert "searched on validation" in next(c["why"] for c in report["choices"] if c["setting"] == "learning_rate")


def test_an_interrupted_search_resumes_to_the_uninterrupted_result(tmp_path, tiny_bert, monkeypatch):
    from fmtune.runner.pipeline import run  # noqa: F401 (imported before the patch below)
    from fmtune.training import loop

    reference = _run(tmp_path, tiny_bert, "reference", rungs=["zero_shot", "fine_tuned"], curve=False)
    real_step, calls = loop._step, {"n": 0}

    def interrupted(run_, idx):
        calls["n"] += 1
        if calls["n"] == 30:  # inside the second trial (the first trains 3 epochs of 7 steps)
            raise KeyboardInterrupt
        real_step(run_, idx)

    monkeypatch.setattr(loop, "_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, tiny_bert, "resumed", rungs=["zero_shot", "fine_tuned"], curve=False)
    partial = tmp_path / "runs" / ".resumed.partial" / "checkpoints"
    assert (partial / "fine_tuned-lr5e-05" / "done.json").is_file(), "the first trial finished and was recorded"
    monkeypatch.setattr(loop, "_step", real_step)
    resumed = _run(tmp_path, tiny_bert, "resumed", rungs=["zero_shot", "fine_tuned"], curve=False, resume=True)
    a, b = (next(r for r in rep["ladder"] if r["name"] == "fine_tuned") for rep in (reference, resumed))
    drop = lambda trials: [{k: v for k, v in t.items() if k != "seconds"} for t in trials]  # noqa: E731
    assert drop(a["search"]["trials"]) == drop(b["search"]["trials"]) and a["learning_rate"] == b["learning_rate"]
    assert a["metrics"] == b["metrics"] and [h["val_loss"] for h in a["history"]] == [h["val_loss"] for h in b["history"]]


def test_the_epoch_line_is_printed_before_the_pruner_may_end_the_trial():
    """A pruned trial's last epoch reaches the console too: the line is printed before the runner's hook runs."""
    import io
    from types import SimpleNamespace

    from rich.console import Console
    from rich.progress import Progress, TextColumn

    from fmtune.tasks import encoder

    class Pruned(Exception):
        pass

    def hook(row):
        raise Pruned

    out = io.StringIO()
    prog = Progress(TextColumn("{task.description}"), console=Console(file=out, width=200))
    task = prog.add_task("x", total=10, info="")
    progress = encoder._epoch_progress(SimpleNamespace(epoch_end=hook), prog, task, "fine-tuning lr 2e-05")
    with pytest.raises(Pruned):
        progress(1, {"epoch": 2, "train_loss": 0.5, "val_loss": 0.4, "val_macro_f1": 0.8, "seconds": 3.0})
    assert "fine-tuning lr 2e-05 epoch 2: train loss 0.5000, val loss 0.4000, val macro-F1 0.800" in out.getvalue()
