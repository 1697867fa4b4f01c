"""Time to verdict: the whole evidence ladder, as a new user runs it with every default, stage by stage.

    .venv/bin/python benchmarks/time_to_verdict.py                              # every set (about an hour on 2 cores)
    .venv/bin/python benchmarks/time_to_verdict.py --sets quickstart,reviews_verdict_gen
    .venv/bin/python benchmarks/time_to_verdict.py --sets chatterbot_topics_en -- --search off   # extra run flags

Sets: `quickstart` is `fmtune quickstart` itself (2,240 training snippets); the others are built from installed
packages by benchmarks/sets.py and run as `fmtune run --data FILE` (longer texts, more classes, a generation set of
the reported shape). Each run is a fresh process with a fresh token cache and registry; it reads its own
/proc/self/io and getrusage when it exits. Recorded per set: wall and CPU seconds, bytes written to storage, peak
resident memory, the run folder's size, every stage's wall / CPU seconds / bytes written / peak memory so far (the
report's run.profile), and the ratios the targets are stated in:

  - whole / fine-tune: the whole run's wall seconds over one fine-tune with the chosen settings (the search's winning
    trial, whose model is the fine_tuned rung; without a search, the rung's own training seconds);
  - written / folder: bytes written to storage over the final run folder's bytes.

Writes benchmarks/results/time_to_verdict.json after each set, keeping rows of sets not run this time. Needs
`make install` (`make bench` is not needed).
"""

from __future__ import annotations

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
sys.path.insert(0, str(ROOT))
DEFAULT_SETS = ["quickstart", "reviews_long_2", "chatterbot_topics_en", "reviews_verdict_gen"]

CHILD = """
import atexit, json, resource, sys, time
from pathlib import Path
dest = Path(sys.argv[1])
def _exit():
    use = resource.getrusage(resource.RUSAGE_SELF)
    io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
    dest.write_text(json.dumps({"cpu_seconds": use.ru_utime + use.ru_stime, "peak_rss_mb": use.ru_maxrss / 1024,
                                "write_bytes": int(io["write_bytes"]), "wchar": int(io["wchar"])}))
atexit.register(_exit)
from fmtune.cli import main
sys.argv = ["fmtune", *sys.argv[2:]]
main()
"""


def fine_tune_seconds(rung: dict) -> tuple[float, str]:
    """One fine-tune with the chosen settings: the search's winning trial (its model is the rung), else the rung."""
    search = rung.get("search") or {}
    for trial in search.get("trials") or []:
        if trial.get("learning_rate") == search.get("winner"):
            return float(trial["seconds"]), f"the search's winning trial (lr {trial['learning_rate']:g}, {trial['epochs']} epochs)"
    return float(rung["train_seconds"]), "the rung's training (no search)"


def measure(name: str, work: Path, extra: list[str]) -> dict:
    from sets import SETS

    out = work / "run"
    if name == "quickstart":
        args = ["quickstart", "--out", str(out)]
    else:
        args = ["run", "--data", str(SETS[name](work / "data")), "--out", str(out), *extra]
    env = {**os.environ, "FMTUNE_CACHE": str(work / "cache"), "FMTUNE_REGISTRY": str(work / "registry.sqlite")}
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(work / "usage.json"), *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"fmtune {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    usage = json.loads((work / "usage.json").read_text())
    report = json.loads((out / "report.json").read_text())
    folder = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and not p.is_symlink())
    primary = report["task"]["primary_metric"]
    rungs = {r["name"]: r for r in report["ladder"]}
    ft_seconds, ft_what = fine_tune_seconds(rungs["fine_tuned"])
    stages = report["run"].get("profile") or []
    trained = {r: rungs[r].get("train_seconds") for r in ("fine_tuned", "from_scratch") if r in rungs}
    return {
        "set": name, "command": "fmtune " + " ".join(a if not a.startswith(str(work)) else Path(a).name for a in args),
        "task": report["task"]["type"], "train_examples": report["data"].get("train"), "test_examples": report["data"].get("test"),
        "wall_seconds": round(wall, 1), "report_wall_seconds": report["run"]["wall_seconds"], "cpu_seconds": round(usage["cpu_seconds"], 1),
        "peak_rss_mb": round(usage["peak_rss_mb"], 1), "write_bytes": usage["write_bytes"], "wchar": usage["wchar"], "run_folder_bytes": folder,
        "fine_tune_seconds": round(ft_seconds, 1), "fine_tune_is": ft_what, "rung_train_seconds": trained,
        "whole_over_fine_tune": round(wall / ft_seconds, 2), "written_over_folder": round(usage["write_bytes"] / folder, 2),
        "stages": stages, "levers": report.get("levers"), "choices": [c for c in report.get("choices", []) if c.get("setting") in CHOICES_SHOWN],
        "primary_metric": primary, "ladder": {r: round(v["metrics"][primary], 4) for r, v in rungs.items()},
        "verdict": report["verdict"]["headline"], "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


CHOICES_SHOWN = {"max_length", "max_new_tokens", "few_shot_k", "epochs", "max_epochs", "learning_rate", "from_scratch_epochs"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default=",".join(DEFAULT_SETS))
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "time_to_verdict.json")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    from fmtune.models.loading import hardware_description

    names = args.sets.split(",")
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    rows = {row["set"]: row for row in previous.get("sets", [])}
    for name in names:
        print(f"{name}: running the whole ladder ...", flush=True)
        with tempfile.TemporaryDirectory(prefix="fmtune-ttv-") as tmp:
            row = measure(name, Path(tmp), extra)
        rows[name] = row
        print(f"  {row['wall_seconds']} s wall ({row['whole_over_fine_tune']}x one fine-tune of {row['fine_tune_seconds']} s), "
              f"{row['write_bytes'] / 1e6:.0f} MB written ({row['written_over_folder']}x the folder), peak {row['peak_rss_mb']:.0f} MB", flush=True)
        for s in row["stages"]:
            print(f"    {s['stage']}: {s['seconds']:.1f} s wall, {s['cpu_seconds']:.1f} s CPU, {(s['written_bytes'] or 0) / 1e6:.1f} MB written", flush=True)
        result = {"benchmark": "time_to_verdict", "hardware": hardware_description(), "cpus": os.cpu_count(), "platform": platform.platform(),
                  "extra_flags": extra, "sets": [rows[n] for n in sorted(rows, key=lambda n: (n not in DEFAULT_SETS, DEFAULT_SETS.index(n) if n in DEFAULT_SETS else 0, n))]}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = args.out.with_suffix(".tmp")
        tmp_out.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp_out, args.out)


if __name__ == "__main__":
    main()
