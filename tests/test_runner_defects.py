"""Defects the three hand-copied pipelines caused (issue: one ladder runner). Each test failed before its fix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from fmtune.errors import ConfigError

FAST = {"learning_rate": 3e-3, "scratch_learning_rate": 3e-3, "bootstrap": 100, "latency_repeats": 3, "batch_size": 16}


def _tiny_generation_data(folder: Path) -> Path:
    from test_generation import colour_pairs, write_jsonl

    return write_jsonl(folder / "colours.jsonl", colour_pairs(40))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    from test_generation import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


# ---- --rungs without a no-training rung ended in a raw ValueError from max() after training everything


def test_rungs_without_a_baseline_is_a_config_error_naming_the_flag(tmp_path):
    from fmtune.config import build_config

    (tmp_path / "d.csv").write_text("text,label\na,b\n")
    with pytest.raises(ConfigError) as err:
        build_config(None, {"data": tmp_path / "d.csv", "rungs": ["fine_tuned"]})
    assert "--rungs fine_tuned" in str(err.value) and "zero_shot" in str(err.value)
    assert build_config(None, {"data": tmp_path / "d.csv", "rungs": ["head_only", "fine_tuned"]})


def test_verdict_with_head_only_as_the_only_baseline():
    from fmtune.evidence import verdict

    rng = np.random.default_rng(0)
    ladder = [{"name": n, "metrics": {"macro_f1": v}, "train_examples": 500, "train_seconds": 1.0} for n, v in (("head_only", 0.6), ("fine_tuned", 0.8))]
    boots = {"head_only": 0.6 + rng.normal(0, 0.01, 200), "fine_tuned": 0.8 + rng.normal(0, 0.01, 200)}
    cost = {"train_seconds": 1.0, "hardware": "CPU", "train_cost": 0.0, "price_per_hour": 0.1}
    v = verdict.verdict(ladder, boots, "macro_f1", None, {}, None, cost)
    assert v["baseline"] == "head_only" and v["recommend_fine_tuning"] is True


def test_generation_runs_honour_rungs(tmp_path, tiny_llama, monkeypatch):
    from fmtune.config import build_config
    from fmtune.runner.pipeline import run as run_generation

    monkeypatch.chdir(tmp_path)
    cfg = build_config(None, {"data": _tiny_generation_data(tmp_path), "model": str(tiny_llama), "out": tmp_path / "runs" / "g", "epochs": 1, "curve": False,
                              "max_new_tokens": 3, "few_shot_k": 1, "rungs": ["zero_shot", "fine_tuned"], **FAST})
    report = json.loads((run_generation(cfg, "test") / "report.json").read_text())
    assert [r["name"] for r in report["ladder"]] == ["zero_shot", "fine_tuned"]


# ---- --metric was ignored for classification; an explicit --epochs 8 was raised, and the manifest disagreed with config.yaml


@pytest.fixture(scope="module")
def accuracy_run(tmp_path_factory, tiny_bert):
    from conftest import make_reviews, write_csv

    from fmtune.config import build_config
    from fmtune.runner.pipeline import run

    work = tmp_path_factory.mktemp("metric")
    data = write_csv(work / "d.csv", make_reviews(120))
    cfg = build_config(None, {"data": data, "model": str(tiny_bert), "out": work / "runs" / "acc", "metric": "accuracy", "curve_fractions": [0.5],
                              "rungs": ["zero_shot", "few_shot", "fine_tuned"], **FAST})
    return run(cfg)


def test_metric_accuracy_decides_a_classification_run(accuracy_run):
    report = json.loads((accuracy_run / "report.json").read_text())
    assert report["task"]["primary_metric"] == "accuracy" and report["learning_curve"]["metric"] == "accuracy"
    ft = next(r for r in report["ladder"] if r["name"] == "fine_tuned")
    assert report["learning_curve"]["points"][-1]["metric"] == ft["metrics"]["accuracy"]
    assert "accuracy" in report["verdict"]["headline"]


def test_derived_epoch_limit_leaves_the_given_config_alone(accuracy_run):
    """The derived limit is a choice in the report; config.yaml and the manifest both record the config as given."""
    report = json.loads((accuracy_run / "report.json").read_text())
    choice = next(c for c in report["choices"] if c["setting"] == "max_epochs")
    assert choice["value"] > 8 and choice["why"].startswith("raised from the default")
    manifest = json.loads((accuracy_run / "manifest.json").read_text())
    given = yaml.safe_load((accuracy_run / "config.yaml").read_text())
    assert manifest["config"]["train"]["epochs"] == given["train"]["epochs"] == 8


def test_a_classification_run_refuses_a_generation_metric(tmp_path, tiny_bert):
    from conftest import make_reviews, write_csv

    from fmtune.config import build_config
    from fmtune.runner.pipeline import run

    cfg = build_config(None, {"data": write_csv(tmp_path / "d.csv", make_reviews(40)), "model": str(tiny_bert), "out": tmp_path / "r", "metric": "rouge_l"})
    with pytest.raises(ConfigError, match="not a classification metric"):
        run(cfg)
    assert not (tmp_path / "r").exists()


def test_explicit_epochs_equal_to_the_default_are_kept():
    from fmtune.config import build_config
    from fmtune.tasks.encoder import max_epochs

    given = build_config(None, {"data": Path(__file__), "epochs": 8}).train
    assert max_epochs(100, given) == (8, "--epochs (8 epochs of 4 steps; early stopping may end sooner)")
    derived, why = max_epochs(100, build_config(None, {"data": Path(__file__)}).train)
    assert derived > 8 and why.startswith("raised")


# ---- the retention gate was written five times, with opposite signs for perplexity and recall


@pytest.mark.parametrize("higher_is_better, change, passed", [(True, -0.3, False), (True, 0.3, True), (False, 0.3, False), (False, -0.3, True), (True, -0.1, True)])
def test_one_gate_for_every_retention_probe(higher_is_better, change, passed):
    from fmtune.evidence import retention

    probe = {"probe": "p", "base": 1.0, "fine_tuned": 1.0 + change, "relative_change": change, "higher_is_better": higher_is_better}
    assert retention.gate(probe, 0.2) == {"max_forgetting": 0.2, "passed": passed}
    assert retention.gate(probe, None)["passed"] is True
    assert retention.forgetting(probe["relative_change"], probe["higher_is_better"]) == pytest.approx(-change if higher_is_better else change)


def test_gate_failure_names_the_probe_and_its_direction(tmp_path):
    from fmtune.errors import GateFailed
    from fmtune.runner.pipeline import raise_if_gate_failed

    report = {"verdict": {"gates": {"max_forgetting": 0.1, "passed": False}},
              "retention": {"probe": "perplexity on general text", "base": 10.0, "fine_tuned": 13.0, "relative_change": 0.3, "higher_is_better": False}}
    with pytest.raises(GateFailed, match="perplexity on general text rose \\+30.0%"):
        raise_if_gate_failed(report, tmp_path)
    report["verdict"]["gates"]["passed"] = True
    raise_if_gate_failed(report, tmp_path)


# ---- causal-LM runs: --resume raised, and their temporary folders were never resumed or cleaned; now they checkpoint


def test_an_interrupted_causal_lm_run_resumes_from_its_checkpoint_to_the_uninterrupted_result(tmp_path, tiny_llama, monkeypatch):
    """Ctrl-C in the middle of a generation fine-tune (checkpoints every 2 steps): the partial folder says to resume,
    --resume continues from the checkpoint and reuses the finished rungs, and the model is the one an uninterrupted run
    trains, bit for bit."""
    import torch
    from safetensors.torch import load_file

    from fmtune.config import build_config
    from fmtune.runner.pipeline import run
    from fmtune.training import loop

    monkeypatch.chdir(tmp_path)
    settings = {"data": _tiny_generation_data(tmp_path), "model": str(tiny_llama), "epochs": 2, "patience": 2, "curve": False, "max_new_tokens": 3,
                "few_shot_k": 1, "rungs": ["zero_shot", "fine_tuned"], "checkpoint_every": 2, "bf16": "off", "threads": 1, **FAST, "batch_size": 4}
    reference = run(build_config(None, {**settings, "out": tmp_path / "runs" / "ref"}), "test")
    real_step = loop._step

    def interrupted(run_, idx):
        if run_.state.step == 5:
            run_.interrupt.requested = True  # what the first Ctrl-C does: the loop checkpoints before the next step, then stops
        real_step(run_, idx)

    monkeypatch.setattr(loop, "_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(build_config(None, {**settings, "out": tmp_path / "runs" / "g"}), "test")
    partial = tmp_path / "runs" / ".g.partial"
    assert "--resume" in (partial / "STATUS").read_text()
    assert (partial / "checkpoints" / "fine_tuned" / "latest").is_file()
    monkeypatch.setattr(loop, "_step", real_step)
    out = run(build_config(None, {**settings, "out": tmp_path / "runs" / "g", "resume": True}), "test")
    assert (out / "report.json").is_file() and not partial.exists()
    a, b = load_file(str(reference / "model" / "model.safetensors")), load_file(str(out / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ft = lambda folder: next(r for r in json.loads((folder / "report.json").read_text())["ladder"] if r["name"] == "fine_tuned")  # noqa: E731
    assert [h["train_loss"] for h in ft(reference)["history"]] == [h["train_loss"] for h in ft(out)["history"]]
    with pytest.raises(ConfigError, match="no unfinished run"):
        run(build_config(None, {**settings, "out": tmp_path / "runs" / "other", "resume": True}), "test")


# ---- the generation audit rewrote the classification audit's English warnings with str.replace


def test_the_audit_words_its_own_warnings_for_generation_pairs():
    from fmtune.data import audit
    from fmtune.data.labeled import Example, Splits

    pairs = [Example(text=f"what colour is the {i} fox\nred", label="pair", source="p.jsonl", row=i + 2) for i in range(30)]
    block = audit.audit(Splits(pairs[:20], pairs[20:25], pairs[25:], ["pair"], {}), classes=False)
    assert any(w.startswith("Only 20 training pairs") for w in block["warnings"])
    assert not any("labeled" in w or "Classes" in w or "label" in w.lower() for w in block["warnings"])
    assert "class_counts" not in block and "conflicting_labels" not in block
    labeled = audit.audit(Splits(pairs[:20], pairs[20:25], pairs[25:], ["pair"], {}))
    assert any(w.startswith("Only 20 labeled training examples") for w in labeled["warnings"]) and "class_counts" in labeled
