"""End-to-end wall time of the quickstarts (audit, every ladder rung, evidence, report), as a new user runs them.

    .venv/bin/python benchmarks/quickstart_time.py                          # both tasks (~15 minutes on 2 cores)
    .venv/bin/python benchmarks/quickstart_time.py --task classification

Each quickstart runs as `fmtune quickstart [--task generation] --out <temp folder>` in a fresh process; the wall time
is measured around the process, and the per-stage times, levers and ladder come from the run's own report.json.
Writes benchmarks/results/quickstart_time.json (tasks not run this time keep their previous entry).
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def run(task: str, keep: Path | None = None) -> dict:
    fmtune = Path(sys.executable).with_name("fmtune")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run" if keep is None else keep / ("quickstart" if task == "classification" else "quickstart-generation")
        args = [str(fmtune), "quickstart", "--out", str(out)] + (["--task", "generation"] if task == "generation" else [])
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "FMTUNE_REGISTRY": str(Path(tmp) / "registry.sqlite")})
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
        report = json.loads((out / "report.json").read_text())
    primary = report["task"]["primary_metric"]
    ladder = {r["name"]: {primary: r["metrics"].get(primary), "ci95": r["ci95"].get(primary), "train_seconds": r.get("train_seconds")} for r in report["ladder"]}
    return {"task": task, "command": " ".join(["fmtune", *args[1:2], *args[4:]]), "wall_seconds": round(wall, 1), "report_wall_seconds": report["run"]["wall_seconds"],
            "stages": report["run"]["stages"], "levers": report.get("levers"), "primary_metric": primary, "ladder": ladder,
            "recommend_fine_tuning": report["verdict"]["recommend_fine_tuning"], "verdict": report["verdict"]["headline"], "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["classification", "generation", "both"], default="both")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "quickstart_time.json")
    parser.add_argument("--keep", type=Path, help="write the run folders into KEEP/quickstart and KEEP/quickstart-generation and keep them (e.g. runs)")
    args = parser.parse_args()
    from fmtune.models.loading import hardware_description

    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    tasks = ["classification", "generation"] if args.task == "both" else [args.task]
    results = dict(previous.get("tasks", {}))
    for task in tasks:
        print(f"running the {task} quickstart ...", flush=True)
        results[task] = {**run(task, args.keep), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        print(f"  {task}: {results[task]['wall_seconds']} s wall, verdict {results[task]['verdict']!r}", flush=True)
        for line in results[task]["stages"]:
            print(f"    {line}")
    result = {"benchmark": "quickstart_time", "machine": {"description": hardware_description(), "platform": platform.platform(), "python": platform.python_version(),
                                                          "cpu_count": os.cpu_count()}, "tasks": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
