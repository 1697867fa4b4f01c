"""End to end through the real entry point on a tiny random BERT and tiny data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch
from safetensors.torch import load_file

SCHEMA = json.loads((Path(__file__).parents[1] / "src" / "fmtune" / "schema" / "report.schema.json").read_text())
FAST = ["--epochs", "6", "--learning-rate", "3e-3", "--scratch-learning-rate", "3e-3", "--bootstrap", "200", "--latency-repeats", "3", "--batch-size", "16"]


def fmtune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fmtune.cli", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_bert):
    import sys as _sys

    _sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_reviews, write_csv

    work = tmp_path_factory.mktemp("e2e")
    data = write_csv(work / "reviews.csv", make_reviews(240) + [("mail me at jane.doe@example.com please good", "pos")])
    proc = fmtune("run", "--data", data, "--model", tiny_bert, "--name", "tiny", "--out", work / "runs" / "tiny", "--redact-pii", *FAST, cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work / "runs" / "tiny", proc


def test_run_folder_is_complete_and_self_describing(finished_run):
    run, proc = finished_run
    for name in ("config.yaml", "manifest.json", "report.json", "report.html", "model/config.json", "model/model.safetensors", "model/README.md", "logs/run.log", "logs/history_fine_tuned.jsonl"):
        assert (run / name).is_file(), name
    assert not list(run.parent.glob(".tiny.tmp-*")), "the temporary folder must be renamed into place"
    assert "fine_tuned" in proc.stdout and "Report:" in proc.stdout


def test_the_report_profiles_every_stage(finished_run):
    """run.profile: one row per stage line of run.stages, with wall and CPU seconds, bytes written and peak memory."""
    run = json.loads((finished_run[0] / "report.json").read_text())["run"]
    profile = run["profile"]
    lines = [line.rsplit(": ", 1) for line in run["stages"]]
    assert [p["stage"] for p in profile] == [name for name, _ in lines]
    assert all(abs(p["seconds"] - float(s.removesuffix(" s"))) <= 0.051 for p, (_, s) in zip(profile, lines))  # the line rounds to 0.1 s
    assert {"rung fine_tuned (full)", "rung from_scratch", "save model"} <= {p["stage"] for p in profile}
    for p in profile:
        assert p["seconds"] >= 0 and p["cpu_seconds"] >= 0 and p["peak_rss_mb"] > 0
        assert p["written_bytes"] is None or p["written_bytes"] >= 0


def test_report_validates_against_the_contract(finished_run):
    report = json.loads((finished_run[0] / "report.json").read_text())
    jsonschema.validate(report, SCHEMA)
    names = [r["name"] for r in report["ladder"]]
    assert names == ["zero_shot", "few_shot", "head_only", "fine_tuned", "from_scratch"]
    assert report["data"]["train"] + report["data"]["validation"] + report["data"]["test"] == 241
    assert report["data"]["audit"]["pii"]["email"] == 1
    assert report["data"]["audit"]["pii_redacted"]["email"] == 1 and sum(report["data"]["audit"]["pii_redacted"].values()) == 1
    assert "jane.doe" not in (finished_run[0] / "report.json").read_text()
    assert {c["setting"] for c in report["choices"]} >= {"max_length", "class_weights", "epochs", "bf16"}
    head = next(c for c in report["choices"] if c["setting"] == "head_learning_rate")
    ft = next(r for r in report["ladder"] if r["name"] == "fine_tuned")
    assert head["value"] == ft["head_learning_rate"] == pytest.approx(30 * ft["learning_rate"]) and head["why"].startswith("default: 30x")
    assert report["data"]["audit"]["vocabulary"]["unk_share"] < 0.02 and report["retention"]["details"]["max_tokens"] >= 64
    assert len(report["learning_curve"]["points"]) == 4
    assert report["retention"]["base"] > 0 and "relative_change" in report["retention"]


def test_fine_tuning_moved_the_weights_and_reloads_with_plain_transformers(finished_run, tiny_bert):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = finished_run[0]
    base = load_file(str(tiny_bert / "model.safetensors"))
    tuned = load_file(str(run / "model" / "model.safetensors"))
    key = next(k for k in tuned if k.endswith("encoder.layer.0.attention.self.query.weight"))
    base_key = next(k for k in base if k.endswith("encoder.layer.0.attention.self.query.weight"))
    assert not torch.equal(base[base_key], tuned[key])
    model = AutoModelForSequenceClassification.from_pretrained(run / "model")
    tok = AutoTokenizer.from_pretrained(run / "model")
    assert model.config.id2label == {0: "neg", 1: "pos"}
    logits = model(**tok(["great fun"], return_tensors="pt")).logits
    assert logits.shape == (1, 2)


def test_fine_tuned_learned_the_easy_task(finished_run):
    report = json.loads((finished_run[0] / "report.json").read_text())
    ft = next(r for r in report["ladder"] if r["name"] == "fine_tuned")
    assert ft["metrics"]["macro_f1"] > 0.8
    assert ft["history"] and ft["best_epoch"] >= 1


def test_predict_cli(finished_run):
    run = finished_run[0]
    proc = fmtune("predict", run, "--text", "great superb fun", "--text", "awful dull mess", "--json", cwd=run.parent)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["label"] for r in rows] == ["pos", "neg"]
    assert abs(sum(rows[0]["probabilities"].values()) - 1) < 1e-5


def test_predict_cli_empty_text_and_blank_file_lines(finished_run):
    run = finished_run[0]
    proc = fmtune("predict", run, "--text", "great superb fun", "--text", "  ", cwd=run.parent)
    assert proc.returncode != 0 and "--text number 2 is empty" in proc.stderr
    texts = run.parent / "texts.txt"
    texts.write_text("great superb fun\n\nawful dull mess\n   \n")
    proc = fmtune("predict", run, "--file", texts, "--json", cwd=run.parent)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["text"] for line in proc.stdout.splitlines()] == ["great superb fun", "awful dull mess"]
    assert "skipped 2 blank line(s) (line 2, 4)" in proc.stderr


def test_verify_and_registry(finished_run):
    run = finished_run[0]
    proc = fmtune("verify", run, cwd=run.parent)
    assert proc.returncode == 0 and "verified" in proc.stdout


def test_existing_folder_needs_overwrite(finished_run, tiny_bert):
    run = finished_run[0]
    proc = fmtune("run", "--data", run.parent.parent / "reviews.csv", "--model", tiny_bert, "--out", run, cwd=run.parent)
    assert proc.returncode == 2
    assert "already exists" in proc.stderr and "--overwrite" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_input_is_a_clear_error_not_a_traceback(tmp_path, tiny_bert):
    bad = tmp_path / "bad.csv"
    bad.write_text("review,label\ngood film,pos\nbad film,neg\n")
    proc = fmtune("run", "--data", bad, "--model", tiny_bert, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "bad.csv" in proc.stderr and "text" in proc.stderr and "--text-column" in proc.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_pickle_only_model_is_refused(tmp_path, reviews_csv):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"not really")
    proc = fmtune("run", "--data", reviews_csv, "--model", folder, cwd=tmp_path)
    assert proc.returncode == 2
    assert "pytorch_model.bin" in proc.stderr and "safetensors" in proc.stderr and "Traceback" not in proc.stderr


def test_from_scratch_rung_warms_up_longer_than_the_fine_tune(tmp_path, tiny_bert, monkeypatch):
    """A random encoder can sit at the majority class under the fine-tune's short warm-up: from_scratch trains with
    at least SCRATCH_WARMUP of its steps warming up, and more patience; the fine-tune keeps the configured settings."""
    import sys as _sys

    _sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_reviews, write_csv

    from fmtune.config import build_config
    from fmtune.runner import pipeline
    from fmtune.tasks.encoder import SCRATCH_EXTRA_PATIENCE, SCRATCH_WARMUP
    from fmtune.training import train

    seen = []
    real_fit = train.fit
    monkeypatch.setattr(train, "fit", lambda model, tok, tr, va, cfg, **kw: seen.append(cfg) or real_fit(model, tok, tr, va, cfg, **kw))
    data = write_csv(tmp_path / "reviews.csv", make_reviews(120))
    cfg = build_config({}, {"data": str(data), "model": str(tiny_bert), "out": str(tmp_path / "run"), "rungs": ["zero_shot", "fine_tuned", "from_scratch"],
                            "curve": False, "epochs": 1, "batch_size": 16, "bootstrap": 100, "latency_repeats": 3})
    pipeline.run(cfg)
    tuned, scratch = seen
    assert tuned.warmup_ratio == cfg.train.warmup_ratio == 0.06 and scratch.warmup_ratio == SCRATCH_WARMUP == 0.2
    assert scratch.patience == tuned.patience + SCRATCH_EXTRA_PATIENCE
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert "warmed up over 20% of the steps" in next(r["description"] for r in report["ladder"] if r["name"] == "from_scratch")


@pytest.mark.parametrize("budget", [1.0, 2.0])
def test_from_scratch_gets_the_fine_tunes_optimizer_steps(tmp_path, tiny_bert, monkeypatch, budget):
    """The report calls from_scratch "the same data and budget": its epoch limit is the epochs the fine-tune ran (same
    data, same batch size: the same optimizer steps); --scratch-budget offers more, as a stated choice."""
    import sys as _sys

    _sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_reviews, write_csv

    from fmtune.config import build_config
    from fmtune.runner import pipeline
    from fmtune.training import train

    seen = []
    real_fit = train.fit

    def spy(model, tok, tr, va, cfg, **kw):
        result = real_fit(model, tok, tr, va, cfg, **kw)
        seen.append((cfg, result))
        return result

    monkeypatch.setattr(train, "fit", spy)
    data = write_csv(tmp_path / "reviews.csv", make_reviews(120))
    cfg = build_config({}, {"data": str(data), "model": str(tiny_bert), "out": str(tmp_path / "run"), "rungs": ["zero_shot", "fine_tuned", "from_scratch"],
                            "curve": False, "epochs": 3, "batch_size": 16, "bootstrap": 100, "latency_repeats": 3, "search": "off",
                            "scratch_budget": budget})
    pipeline.run(cfg)
    (tuned_cfg, tuned), (scratch_cfg, scratch) = seen
    assert tuned_cfg.epochs == 3 and scratch_cfg.epochs == round(budget * tuned.epochs_run)
    assert scratch.epochs_run <= scratch_cfg.epochs
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    choice = next(c for c in report["choices"] if c["setting"] == "from_scratch_epochs")
    assert choice["value"] == scratch_cfg.epochs
    assert ("same optimizer steps" in choice["why"]) == (budget == 1.0) and ("larger budget" in choice["why"]) == (budget != 1.0)
    row = next(r for r in report["ladder"] if r["name"] == "from_scratch")
    assert f"{scratch.epochs_run} epochs run" in row["description"] and "max 3 epochs" not in row["description"]
