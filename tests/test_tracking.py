"""--track mlflow / tensorboard and `fmtune runs export`: a real run read back with MLflow's client (a local SQLite
store) and TensorBoard's own event reader; the tracking URI (it may hold credentials) never lands in the run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import fmtune
from fmtune.errors import FmtuneError

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")

TINY = dict(epochs=2, curve=False, rungs=["zero_shot", "fine_tuned"], bootstrap=100, latency_repeats=3, quiet=True)


@pytest.fixture()
def tracked_run(tmp_path_factory, tiny_bert):
    from conftest import make_reviews, write_csv

    work = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_EXPERIMENT_NAME", "reviews")
        data = write_csv(work / "reviews.csv", make_reviews(100))
        result = fmtune.run(data=data, model=str(tiny_bert), out="runs/tracked", track=["mlflow", "tensorboard"], **TINY)
    return work, uri, work / result.run_dir


def test_mlflow_holds_the_config_ladder_history_verdict_and_files(tracked_run):
    from mlflow.tracking import MlflowClient

    work, uri, run_dir = tracked_run
    report = json.loads((run_dir / "report.json").read_text())
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("reviews")
    (run,) = client.search_runs([experiment.experiment_id])
    ft = next(r for r in report["ladder"] if r["name"] == "fine_tuned")
    assert run.data.params["train.epochs"] == "2" and run.data.params["model.model"] == report["base_model"]["name"]
    assert run.data.metrics["fine_tuned.macro_f1"] == pytest.approx(ft["metrics"]["macro_f1"])
    assert run.data.metrics["fine_tuned.macro_f1.ci95_low"] == pytest.approx(ft["ci95"]["macro_f1"][0])
    history = client.get_metric_history(run.info.run_id, "fine_tuned.history.val_loss")
    assert [m.step for m in history] == [row["epoch"] for row in ft["history"]]
    assert [m.value for m in history] == pytest.approx([row["val_loss"] for row in ft["history"]])
    assert run.data.tags["fmtune.verdict"] == report["verdict"]["headline"] and run.data.tags["fmtune.run_dir"] == str(run_dir.resolve())
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.html", "report.json", "config.yaml", "manifest.json", "model"} <= files
    assert "model/model.safetensors" in {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert run.info.status == "FINISHED"


def test_tensorboard_events_are_in_the_run_folder_and_covered_by_its_manifest(tracked_run):
    from fmtune.store import lineage, tracking

    _, _, run_dir = tracked_run
    report = json.loads((run_dir / "report.json").read_text())
    assert report["tracking"]["tensorboard"]["log_dir"] == "tensorboard"
    scalars = tracking.read_back_scalars(run_dir / "tensorboard")
    ft = next(r for r in report["ladder"] if r["name"] == "fine_tuned")
    assert [step for step, _ in scalars["fine_tuned/val_loss"]] == [row["epoch"] for row in ft["history"]]
    assert scalars["ladder/fine_tuned.macro_f1"][0][1] == pytest.approx(ft["metrics"]["macro_f1"], abs=1e-6)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert any(name.startswith("tensorboard/") for name in manifest["outputs"]), "the event file is part of the sealed folder"
    assert lineage.check_run(run_dir).problems == []


def test_runs_export_sends_a_finished_run_to_either_tracker(tracked_run, monkeypatch):
    from mlflow.tracking import MlflowClient

    from fmtune.cli import app
    from fmtune.store import tracking

    work, _, run_dir = tracked_run
    monkeypatch.chdir(work)
    uri = f"sqlite:///{work / 'export.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = CliRunner().invoke(app, ["runs", "export", str(run_dir), "--to", "mlflow", "--experiment", "later"])
    assert out.exit_code == 0, out.output
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("later").experiment_id])
    assert "fine_tuned.macro_f1" in run.data.metrics
    out = CliRunner().invoke(app, ["runs", "export", str(run_dir), "--to", "tensorboard", "--logdir", str(work / "tb")])
    assert out.exit_code == 0, out.output
    assert "fine_tuned/val_loss" in tracking.read_back_scalars(work / "tb")
    inside = CliRunner().invoke(app, ["runs", "export", str(run_dir), "--to", "tensorboard", "--logdir", str(run_dir / "tb2")])
    assert inside.exit_code != 0 and "inside the run folder" in str(inside.exception or inside.output)
    assert not (run_dir / "tb2").exists()


def test_an_unreachable_tracker_with_credentials_costs_neither_the_run_nor_the_secret(tmp_path, tiny_bert, monkeypatch, capfd):
    from conftest import make_reviews, write_csv

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:S3CRET-TOKEN@127.0.0.1:9/")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    data = write_csv(tmp_path / "reviews.csv", make_reviews(80))
    result = fmtune.run(data=data, model=str(tiny_bert), out="runs/offline", track=["mlflow"], **{**TINY, "quiet": False})
    assert (result.run_dir / "report.json").is_file(), "the run is complete"
    printed = "".join(capfd.readouterr())
    assert "could not send the run to MLflow" in " ".join(printed.split()) and "S3CRET-TOKEN" not in printed
    for path in [*result.run_dir.rglob("*"), tmp_path / "registry.sqlite"]:
        if path.is_file():
            assert b"S3CRET-TOKEN" not in path.read_bytes(), path


def test_a_missing_tracker_is_said_before_the_run_starts(tmp_path, reviews_csv, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FmtuneError, match=r"--track mlflow: not installed. Fix: pip install 'fmtune\[mlflow\]'"):
        fmtune.run(data=reviews_csv, out="runs/none", track=["mlflow"], **TINY)
    assert not Path("runs/none").exists()
