"""Experiment trackers: a finished run's config, ladder, per-epoch history, verdict and files sent to MLflow or TensorBoard.

Both are optional extras, imported only when asked for (`pip install 'fmtune[mlflow]'` / `'fmtune[tensorboard]'`).
MLflow is reached the way MLflow users configure it (MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME): the URI can hold
credentials, so it is never written into the run's config, report or logs (the report keeps it without them).
TensorBoard event files are written into the run folder (`tensorboard/`) before its manifest, or into a given folder.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from fmtune.errors import FmtuneError

TRACKERS = ("mlflow", "tensorboard")
INSTALL = {"mlflow": "pip install 'fmtune[mlflow]'  (mlflow-skinny with its SQLite store)", "tensorboard": "pip install 'fmtune[tensorboard]'"}
DEFAULT_EXPERIMENT = "fmtune"


def check_available(trackers: list[str]) -> None:
    """Before a run starts: every tracker asked for is installed, else say how to install it."""
    import importlib.util

    modules = {"mlflow": "mlflow", "tensorboard": "tensorboard"}
    missing = [t for t in trackers if importlib.util.find_spec(modules[t]) is None]
    if missing:
        raise FmtuneError(f"--track {','.join(missing)}: not installed. Fix: " + "; ".join(INSTALL[t] for t in missing) + ", or drop --track.")


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """The resolved config as dotted names -> strings (lists as JSON), MLflow's params."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value) and key not in ("label_descriptions", "compare"):
            out.update(flat_params(value, name + "."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out


def ladder_metrics(report: dict) -> dict[str, float]:
    """Every rung's test metrics and their 95% CI bounds, the verdict's gains: name -> value."""
    out: dict[str, float] = {}
    for rung in report.get("ladder") or []:
        for metric, value in (rung.get("metrics") or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[f"{rung['name']}.{metric}"] = float(value)
        for metric, ci in (rung.get("ci95") or {}).items():
            if isinstance(ci, list) and len(ci) == 2:
                out[f"{rung['name']}.{metric}.ci95_low"], out[f"{rung['name']}.{metric}.ci95_high"] = float(ci[0]), float(ci[1])
        out[f"{rung['name']}.train_seconds"] = float(rung.get("train_seconds") or 0.0)
    v = report.get("verdict") or {}
    for key in ("gain", "gain_over_strongest"):
        if isinstance(v.get(key), int | float):
            out[f"verdict.{key}"] = float(v[key])
    return out


def histories(report: dict) -> dict[str, list[dict]]:
    """The trained rungs' per-epoch rows (numbers only): rung -> rows with their epoch."""
    out = {}
    for rung in report.get("ladder") or []:
        rows = [{k: float(x) for k, x in row.items() if isinstance(x, int | float) and not isinstance(x, bool)} for row in rung.get("history") or []]
        if rows:
            out[rung["name"]] = rows
    return out


def tags(report: dict, run_dir: Path) -> dict[str, str]:
    v, task, base = report.get("verdict") or {}, report.get("task") or {}, report.get("base_model") or {}
    out = {"fmtune.version": str(report.get("fmtune_version", "")), "fmtune.run_dir": str(Path(run_dir).resolve()), "fmtune.task": str(task.get("type", "")),
           "fmtune.primary_metric": str(task.get("primary_metric", "")), "fmtune.base_model": str(base.get("name", "")),
           "fmtune.data_sha256": str((report.get("data") or {}).get("sha256", "")), "fmtune.verdict": str(v.get("headline", "")),
           "fmtune.recommend_fine_tuning": str(v.get("recommend_fine_tuning", "")), "fmtune.strongest_alternative": str(v.get("strongest_alternative", ""))}
    return {k: value[:5000] for k, value in out.items()}


def without_credentials(uri: str) -> str:
    """A tracking URI as it may be shown: user:password@ and query strings (tokens) removed."""
    return re.sub(r"\?.*$", "", re.sub(r"//[^/@]*@", "//", uri))


# ---------------------------------------------------------------- MLflow


def to_mlflow(run_dir: Path, report: dict, config: dict, tracking_uri: str | None = None, experiment: str | None = None) -> dict:
    """One MLflow run for a finished fmtune run: params, metrics (history as steps), tags, report and model as
    artifacts. Returns {tracking_uri (without credentials), experiment, run_id}."""
    try:
        import mlflow
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise FmtuneError(f"--track mlflow: MLflow is not installed ({exc}). Fix: {INSTALL['mlflow']}.") from None
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    client = MlflowClient(uri)
    name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    found = client.get_experiment_by_name(name)
    experiment_id = found.experiment_id if found is not None else client.create_experiment(name)
    run = client.create_run(experiment_id, run_name=str((report.get("run") or {}).get("name") or Path(run_dir).name), tags=tags(report, run_dir))
    run_id = run.info.run_id
    try:
        from mlflow.entities import Metric, Param

        params = [Param(k, v[:6000]) for k, v in flat_params(config).items()]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i : i + 100])
        stamp = int(1000 * os.path.getmtime(Path(run_dir) / "report.json")) if (Path(run_dir) / "report.json").exists() else 0
        metrics = [Metric(k, v, stamp, 0) for k, v in ladder_metrics(report).items()]
        for rung, rows in histories(report).items():
            for i, row in enumerate(rows, start=1):
                step = int(row.get("epoch", i))
                metrics += [Metric(f"{rung}.history.{k}", v, stamp, step) for k, v in row.items() if k != "epoch"]
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i : i + 1000])
        for file in ("report.html", "report.json", "config.yaml", "manifest.json"):
            if (Path(run_dir) / file).is_file():
                client.log_artifact(run_id, str(Path(run_dir) / file))
        if (Path(run_dir) / "model").is_dir():
            client.log_artifacts(run_id, str(Path(run_dir) / "model"), artifact_path="model")
        client.set_terminated(run_id, "FINISHED")
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    return {"tracking_uri": without_credentials(uri), "experiment": name, "run_id": run_id}


# ---------------------------------------------------------------- TensorBoard


def to_tensorboard(log_dir: Path, report: dict, config: dict) -> dict:
    """An event file in `log_dir`: the history as scalars per epoch, the ladder's metrics, the config and verdict as text."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise FmtuneError(f"--track tensorboard: TensorBoard is not installed ({exc}). Fix: {INSTALL['tensorboard']}.") from None
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for rung, rows in histories(report).items():
            for i, row in enumerate(rows, start=1):
                step = int(row.get("epoch", i))
                for k, v in row.items():
                    if k != "epoch":
                        writer.add_scalar(f"{rung}/{k}", v, step)
        for k, v in ladder_metrics(report).items():
            writer.add_scalar(f"ladder/{k}", v, 0)
        writer.add_text("verdict", str((report.get("verdict") or {}).get("headline", "")), 0)
        writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in flat_params(config).items()), 0)
    finally:
        writer.close()
    return {"log_dir": str(log_dir), "files": sorted(p.name for p in Path(log_dir).glob("events.out.tfevents.*"))}


def read_back_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard's own reader over `log_dir`: tag -> [(step, value)] (what a user's TensorBoard shows)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags().get("scalars", [])}


def summary(results: dict[str, Any]) -> str:
    parts = []
    if "mlflow" in results:
        m = results["mlflow"]
        parts.append(f"MLflow run {m['run_id']} in experiment '{m['experiment']}' at {m['tracking_uri']}")
    if "tensorboard" in results:
        parts.append(f"TensorBoard events in {results['tensorboard']['log_dir']}")
    return "; ".join(parts)
