"""The end of every run: report.json, report.html, the model card, logs/run.log and the manifest, then the folder is moved
into place and recorded in the registry."""

from __future__ import annotations

import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from fmtune.config import RunConfig
from fmtune.console import console
from fmtune.runner.folder import disk_line, replace_folder


def finish(report: dict, cfg: RunConfig, tmp: Path, out: Path, wall_start: float, model_path: Path, io_start: dict[str, int] | None = None) -> None:
    """Write report.json, report.html, the model card and the manifest, then move the folder into place."""
    from fmtune.models import loading
    from fmtune.store import lineage, registry

    report["run"]["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    report["run"]["wall_seconds"] = round(time.perf_counter() - wall_start, 2)
    shutil.rmtree(tmp / "checkpoints", ignore_errors=True)  # only needed to resume an unfinished run
    lineage.write_json_atomic(tmp / "report.json", report)
    try:
        from fmtune.runner import report_html

        report_html.write_html(report, tmp / "report.html")
        (tmp / "model" / "README.md").write_text(report_html.render_model_card(report))
    except ImportError:  # pragma: no cover - the HTML report module ships with fmtune
        pass
    (tmp / "logs" / "run.log").write_text("\n".join(report["run"]["stages"] + [disk_line(io_start, tmp)]) + "\n")
    base_files = {p.name: lineage.sha256_file(p) for p in sorted(Path(model_path).glob("*.safetensors"))}
    manifest = lineage.build_manifest(
        config=cfg.model_dump(mode="json"), input_files={str(Path(p).resolve()): h for p, h in report["data"]["files"].items()}, data_sha256=report["data"]["sha256"],
        base_model={"name": report["base_model"]["name"], "path": str(model_path), "files": base_files}, seed=cfg.seed, run_dir=tmp,
        hardware=loading.hardware_description(),
    )
    lineage.write_json_atomic(tmp / "manifest.json", manifest)
    replace_folder(tmp, out)
    try:
        registry.record_run(out, report, "complete")
    except Exception as exc:  # the registry is a convenience; it must never lose a run
        console.print(f"[yellow]warning:[/] could not record the run in the registry ({exc}).")
