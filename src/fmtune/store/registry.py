"""The run registry: one embedded SQLite file that remembers every run, so runs can be listed and compared.

A run is keyed by its final folder (resolved path) and has an id; two runs with the same name in different folders
are two rows. Commands take a run's name, folder or id; an ambiguous name is an error that lists the candidates.

The file is shared by concurrent runs: WAL journal, a 30 s busy timeout and one short `BEGIN IMMEDIATE`
transaction per write keep writers from corrupting it or failing on a lock. A registry written by fmtune 0.1
(schema 1, keyed by name) is migrated in place the first time it is opened; its rows are kept.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sqlite3
import sys
from contextlib import closing
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from fmtune.errors import FmtuneError
from fmtune.version import __version__

SCHEMA_VERSION = 2
STATUSES = ("running", "complete", "interrupted", "failed")
RUNG_ORDER = ("zero_shot", "few_shot", "head_only", "fine_tuned", "from_scratch")
BUSY_TIMEOUT_S = 30.0
ENV_VAR = "FMTUNE_REGISTRY"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    run_dir         TEXT NOT NULL,
    name            TEXT NOT NULL,
    work_dir        TEXT,
    status          TEXT NOT NULL,
    task_type       TEXT,
    base_model      TEXT,
    primary_metric  TEXT,
    rung_metrics    TEXT NOT NULL DEFAULT '{}',
    recommend       INTEGER,
    gain            REAL,
    data_sha256     TEXT,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    fmtune_version  TEXT,
    report          TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_dir ON runs (run_dir);
CREATE INDEX IF NOT EXISTS runs_by_name ON runs (name)
"""
# The schema 1 columns, copied as they are when a schema 1 registry is migrated.
_V1_COLUMNS = (
    "name, run_dir, status, task_type, base_model, primary_metric, rung_metrics, recommend, gain, data_sha256, "
    "created_at, updated_at, fmtune_version, report"
)
_SUMMARY_COLUMNS = (
    "id, name, run_dir, work_dir, status, task_type, base_model, primary_metric, rung_metrics, recommend, gain, "
    "data_sha256, created_at, updated_at, fmtune_version"
)
# The temporary folders the pipelines write a run in before it is moved to its final folder <name>.
_TEMPORARY_FOLDER = re.compile(r"^\.(?P<final>.+)\.(?:partial|tmp-\d+)$")

RegistryOption = Annotated[
    Path | None,
    typer.Option("--registry", help=f"Registry file (default: ${ENV_VAR}, else the user data folder's fmtune/registry.sqlite)."),
]


def registry_path(explicit: Path | None = None) -> Path:
    """Where the registry lives: --registry, else $FMTUNE_REGISTRY, else <user data dir>/fmtune/registry.sqlite."""
    if explicit is not None:
        return Path(explicit).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("fmtune")) / "registry.sqlite"


def _prepare(conn: sqlite3.Connection) -> int | None:
    """Inside a write transaction: create the schema, or migrate a schema 1 registry. Returns a newer schema version
    found in the file (nothing is changed then), else None."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    version = conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] if "schema_version" in tables else None
    if version is not None and version > SCHEMA_VERSION:
        return version
    if "runs" in tables and "id" not in {r[1] for r in conn.execute("PRAGMA table_info(runs)")}:
        # Schema 1 was keyed by run name; keep every row, oldest first so ids follow the order runs were made.
        conn.execute("ALTER TABLE runs RENAME TO runs_v1")
        tables.discard("runs")
    for statement in filter(str.strip, _SCHEMA.split(";")):
        conn.execute(statement)
    if "runs_v1" in {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}:
        conn.execute(f"INSERT INTO runs ({_V1_COLUMNS}) SELECT {_V1_COLUMNS} FROM runs_v1 ORDER BY created_at, name")
        conn.execute("DROP TABLE runs_v1")
    if version != SCHEMA_VERSION:
        conn.execute("DELETE FROM schema_version")
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
    return None


def _connect(path: Path) -> sqlite3.Connection:
    """Open (creating or migrating if needed) the registry in WAL mode with the schema in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            newer = _prepare(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    except sqlite3.DatabaseError as e:
        conn.close()
        raise FmtuneError(f"{path}: cannot open the run registry ({e}); pass --registry or set ${ENV_VAR} to another file.") from e
    if newer is not None:
        conn.close()
        raise FmtuneError(
            f"{path}: the run registry has schema version {newer}, written by a newer fmtune (this one reads {SCHEMA_VERSION}); "
            "upgrade fmtune or point --registry at another file."
        )
    conn.row_factory = sqlite3.Row
    return conn


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _summary(report: dict | None) -> dict[str, Any]:
    """The columns taken from a report (tolerating partial reports of failed or interrupted runs)."""
    report = report or {}
    task = report.get("task") or {}
    primary = task.get("primary_metric")
    rung_metrics = {
        rung["name"]: (rung.get("metrics") or {}).get(primary)
        for rung in report.get("ladder") or []
        if isinstance(rung, dict) and "name" in rung
    }
    verdict = report.get("verdict") or {}
    recommend = verdict.get("recommend_fine_tuning")
    return {
        "task_type": task.get("type"),
        "base_model": (report.get("base_model") or {}).get("name"),
        "primary_metric": primary,
        "rung_metrics": json.dumps(rung_metrics),
        "recommend": None if recommend is None else int(bool(recommend)),
        "gain": verdict.get("gain"),
        "data_sha256": (report.get("data") or {}).get("sha256"),
        "fmtune_version": report.get("fmtune_version") or __version__,
        "report": json.dumps(report, default=str) if report else None,
    }


def final_folder(run_dir: Path) -> tuple[Path, Path | None]:
    """(final run folder, temporary folder or None): a pipeline's temporary folder `.<name>.partial` or
    `.<name>.tmp-<pid>` stands for the final folder <name> beside it."""
    run_dir = Path(run_dir)
    match = _TEMPORARY_FOLDER.match(run_dir.name)
    return (run_dir.parent / match["final"], run_dir) if match else (run_dir, None)


def record_run(run_dir: Path, report: dict | None, status: str, db: Path | None = None, *, work_dir: Path | None = None) -> int:
    """Insert or update the run whose final folder is run_dir with this status and report; returns the run's id.

    A run is keyed by its final folder, so pass the same folder for every status (running, interrupted, failed,
    complete); a temporary folder (`.<name>.partial`, `.<name>.tmp-<pid>`) is recorded under the final one.
    `work_dir` is where the unfinished run's files are (shown by `runs show`); it is kept until the run is complete.
    The name is report["run"]["name"], else the folder's name. Every column but id and created_at is replaced, so a
    re-run into the same folder does not keep stale results.
    """
    if status not in STATUSES:
        raise ValueError(f"record_run: status {status!r} is not one of {STATUSES}")
    run_dir, temporary = final_folder(Path(run_dir))
    work_dir = work_dir if work_dir is not None else temporary
    name = ((report or {}).get("run") or {}).get("name") or run_dir.name
    row = {
        "run_dir": str(run_dir.resolve()), "name": name, "status": status,
        "work_dir": None if work_dir is None or status == "complete" else str(Path(work_dir).resolve()), **_summary(report),
    }
    now = _now()
    with closing(_connect(registry_path(db))) as conn:
        conn.execute("BEGIN IMMEDIATE")
        try:
            found = conn.execute(
                "SELECT id, work_dir FROM runs WHERE run_dir = ? ORDER BY updated_at DESC, id DESC LIMIT 1", (row["run_dir"],)
            ).fetchone()
            if found is None:
                columns = [*row, "created_at", "updated_at"]
                cursor = conn.execute(
                    f"INSERT INTO runs ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})", [*row.values(), now, now]
                )
                run_id = cursor.lastrowid
            else:
                run_id = found["id"]
                if row["work_dir"] is None and status != "complete":
                    row["work_dir"] = found["work_dir"]  # a later status of an unfinished run keeps where its files are
                assignments = ", ".join(f"{c} = ?" for c in [*row, "updated_at"])
                conn.execute(f"UPDATE runs SET {assignments} WHERE id = ?", [*row.values(), now, run_id])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return run_id


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    run = dict(row)
    run["rung_metrics"] = json.loads(run["rung_metrics"] or "{}")
    run["recommend"] = None if run["recommend"] is None else bool(run["recommend"])
    if "report" in run:
        run["report"] = json.loads(run["report"]) if run["report"] else None
    return run


def list_runs(db: Path | None = None) -> list[dict]:
    """Every recorded run (without its full report), most recently updated first."""
    path = registry_path(db)
    if not path.exists():
        return []
    with closing(_connect(path)) as conn:
        rows = conn.execute(f"SELECT {_SUMMARY_COLUMNS} FROM runs ORDER BY updated_at DESC, id DESC").fetchall()
    return [_decode(r) for r in rows]


def _looks_like_path(ref: str) -> bool:
    return "/" in ref or os.sep in ref or ref.startswith(("~", "."))


def _find(conn: sqlite3.Connection, ref: str, path: Path) -> sqlite3.Row | None:
    """The run `ref` names: a folder (the newest run recorded there), a run name, or an id (`12` or `#12`). A name
    given to several runs is an FmtuneError that lists them; a path-like ref is tried as a folder first."""
    select = f"SELECT {_SUMMARY_COLUMNS}, report FROM runs"

    def by_folder() -> list[sqlite3.Row]:
        folder = str(Path(ref).expanduser().resolve())
        return conn.execute(f"{select} WHERE run_dir = ? ORDER BY updated_at DESC, id DESC LIMIT 1", (folder,)).fetchall()

    def by_name() -> list[sqlite3.Row]:
        return conn.execute(f"{select} WHERE name = ? ORDER BY updated_at DESC, id DESC", (ref,)).fetchall()

    def by_id() -> list[sqlite3.Row]:
        digits = ref.removeprefix("#")
        return conn.execute(f"{select} WHERE id = ?", (int(digits),)).fetchall() if digits.isdigit() else []

    for finder in (by_folder, by_name, by_id) if _looks_like_path(ref) else (by_name, by_id, by_folder):
        rows = finder()
        if len(rows) > 1:
            candidates = [f"id {r['id']}: {r['run_dir']} ({r['status']}, updated {_time(r['updated_at'])} UTC)" for r in rows]
            raise FmtuneError(
                f"{ref!r} names {len(rows)} runs in the registry {path}; pass the run's id or its folder instead "
                f"(e.g. {rows[0]['id']} or {rows[0]['run_dir']}):",
                problems=candidates,
            )
        if rows:
            return rows[0]
    return None


def get_run(ref: str, db: Path | None = None) -> dict:
    """One run with its full report (key "report"), found by name, folder or id. An unknown ref is an FmtuneError
    that names close matches; a name shared by several runs is an FmtuneError that lists them (pick by id or folder)."""
    path = registry_path(db)
    row, names = None, []
    if path.exists():
        with closing(_connect(path)) as conn:
            row = _find(conn, ref, path)
            if row is None:
                names = [r[0] for r in conn.execute("SELECT DISTINCT name FROM runs ORDER BY name")]
    if row is not None:
        return _decode(row)
    if not names:
        raise FmtuneError(f"no run named {ref!r}: the registry {path} is empty; `fmtune run` records each run there.")
    close = difflib.get_close_matches(ref, names, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else f"known runs: {', '.join(names[:10])}"
    raise FmtuneError(f"no run named {ref!r} in the registry {path}; {hint} "
                      "(`fmtune runs list` shows them all; a run can also be given by its folder or its id)")


def _rung(report: dict | None, rung: str) -> dict:
    for entry in (report or {}).get("ladder") or []:
        if entry.get("name") == rung:
            return entry
    return {}


def _ordered_rungs(*rung_names: list[str]) -> list[str]:
    seen = [r for names in rung_names for r in names]
    known = [r for r in RUNG_ORDER if r in seen]
    return known + sorted(set(seen) - set(known))


def compare_runs(a: str, b: str, db: Path | None = None) -> dict:
    """Runs a and b (each a name, folder or id) side by side: task, base model, data, each rung's primary metric with
    95% CI, delta b - a, verdicts."""
    run_a, run_b = get_run(a, db), get_run(b, db)
    metric = run_a["primary_metric"] or run_b["primary_metric"]
    notes = []
    if run_a["id"] == run_b["id"]:
        notes.append(f"{a!r} and {b!r} are the same run (id {run_a['id']}, {run_a['run_dir']})")
    if run_a["task_type"] != run_b["task_type"]:
        notes.append(f"different tasks ({run_a['task_type']} vs {run_b['task_type']}): the numbers are not comparable")
    if run_a["primary_metric"] != run_b["primary_metric"]:
        notes.append(f"different primary metrics ({run_a['primary_metric']} vs {run_b['primary_metric']}): comparing {metric}")
    same_data = bool(run_a["data_sha256"]) and run_a["data_sha256"] == run_b["data_sha256"]
    if not same_data:
        notes.append("the runs used different data (or one did not record it): deltas mix the effect of the data with the method's")

    rungs = []
    for rung in _ordered_rungs(list(run_a["rung_metrics"]), list(run_b["rung_metrics"])):
        side = {}
        for key, run in (("a", run_a), ("b", run_b)):
            entry = _rung(run["report"], rung)
            side[key] = (entry.get("metrics") or {}).get(metric)
            side[f"{key}_ci95"] = (entry.get("ci95") or {}).get(metric)
        delta = side["b"] - side["a"] if side["a"] is not None and side["b"] is not None else None
        rungs.append({"name": rung, **side, "delta": delta})

    def verdict(run: dict) -> dict:
        v = (run["report"] or {}).get("verdict") or {}
        return {"recommend": run["recommend"], "gain": run["gain"], "gain_ci95": v.get("gain_ci95"), "headline": v.get("headline")}

    return {
        "a": run_a["name"],
        "b": run_b["name"],
        "id": {"a": run_a["id"], "b": run_b["id"]},
        "run_dir": {"a": run_a["run_dir"], "b": run_b["run_dir"]},
        "metric": metric,
        "task": {"a": run_a["task_type"], "b": run_b["task_type"]},
        "base_model": {"a": run_a["base_model"], "b": run_b["base_model"]},
        "status": {"a": run_a["status"], "b": run_b["status"]},
        "data_sha256": {"a": run_a["data_sha256"], "b": run_b["data_sha256"]},
        "same_data": same_data,
        "rungs": rungs,
        "verdict": {"a": verdict(run_a), "b": verdict(run_b)},
        "notes": notes,
    }


# ---------------------------------------------------------------- command line

runs_app = typer.Typer(help="The run registry: list, show and compare runs.", no_args_is_help=True)


def _e(value: Any) -> str:
    """A user-supplied value as literal text (rich would read '[...]' in it as markup)."""
    from rich.markup import escape

    return "—" if value is None else escape(str(value))


def _num(value: Any, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _ci(ci: Any) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if isinstance(ci, (list, tuple)) and len(ci) == 2 else ""


def _signed(value: Any) -> str:
    return "—" if value is None else f"{value:+.3f}"


def _verdict_text(recommend: bool | None, gain: float | None) -> str:
    if recommend is None:
        return "—"
    word = "[green]fine-tune[/green]" if recommend else "[yellow]don't[/yellow]"
    return f"{word} ({_signed(gain)})" if gain is not None else word


def _status_text(status: str) -> str:
    colour = {"complete": "green", "running": "cyan", "interrupted": "yellow", "failed": "red"}.get(status, "white")
    return f"[{colour}]{status}[/{colour}]"


def _time(iso: str | None) -> str:
    return (iso or "")[:16].replace("T", " ")


class ListFormat(str, Enum):
    table = "table"
    tsv = "tsv"
    json = "json"


# Short rung headers for narrow terminals.
_RUNG_ABBREVIATIONS = {"zero_shot": "zero", "few_shot": "few", "head_only": "head", "fine_tuned": "tuned", "from_scratch": "scratch"}
# Table layouts from the most to the least informative; `runs list` prints the first that fits the terminal.
# "metric": False moves the metric into the title when every run has the same one; "gain": False leaves the verdict's
# gain to `runs show`.
_LAYOUTS = (
    {"task": True, "base": True, "metric": True, "updated": "full", "short": False, "gain": True},
    {"task": False, "base": True, "metric": True, "updated": "full", "short": False, "gain": True},
    {"task": False, "base": False, "metric": True, "updated": "full", "short": False, "gain": True},
    {"task": False, "base": False, "metric": True, "updated": "short", "short": True, "gain": True},
    {"task": False, "base": False, "metric": False, "updated": "short", "short": True, "gain": True},
    {"task": False, "base": False, "metric": False, "updated": None, "short": True, "gain": True},
    {"task": False, "base": False, "metric": False, "updated": None, "short": True, "gain": False},
)
NAME_CELLS = 20  # `runs list` folds longer names onto more lines before it hides columns
_TSV_SCALARS = ("id", "name", "status", "task_type", "base_model", "primary_metric")


def _tsv_cell(value: Any) -> str:
    """A value as one TSV cell: numbers exactly as stored, nothing for a missing value, no tabs or line breaks."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return re.sub(r"[\t\r\n]+", " ", str(value))


def _runs_tsv(runs: list[dict], rungs: list[str]) -> str:
    header = ["id", "name", "status", "task", "base_model", "metric", *rungs, "recommend", "gain", "updated_at", "run_dir"]
    lines = ["\t".join(header)]
    for run in runs:
        cells = [*(run[key] for key in _TSV_SCALARS), *(run["rung_metrics"].get(rung) for rung in rungs),
                 run["recommend"], run["gain"], run["updated_at"], run["run_dir"]]
        lines.append("\t".join(map(_tsv_cell, cells)))
    return "\n".join(lines) + "\n"


def _short_verdict(recommend: bool | None, gain: float | None, with_gain: bool = True) -> str:
    if recommend is None:
        return "—"
    word = "[green]yes[/green]" if recommend else "[yellow]no[/yellow]"
    return f"{word} {_signed(gain)}" if gain is not None and with_gain else word


def _runs_table(runs: list[dict], rungs: list[str], layout: dict, registry: Path | None):
    from rich.table import Table

    metrics = {r["primary_metric"] for r in runs if r["primary_metric"]}
    show_metric = layout["metric"] or len(metrics) > 1
    title = f"runs in {registry_path(registry)}"
    if not show_metric and metrics:
        title += f" ({next(iter(metrics))} on the test set)"
    table = Table(title=title, box=None, pad_edge=False, title_justify="left", header_style="bold underline")
    table.add_column("id", justify="right", no_wrap=True)
    table.add_column("name", style="bold", overflow="fold", min_width=8)
    table.add_column("status", no_wrap=True)
    if layout["task"]:
        table.add_column("task", no_wrap=True)
    if layout["base"]:
        table.add_column("base model", overflow="fold")
    if show_metric:
        table.add_column("metric", no_wrap=True)
    for rung in rungs:
        table.add_column(_RUNG_ABBREVIATIONS.get(rung, rung) if layout["short"] else rung, justify="right", no_wrap=True)
    table.add_column(("fine-tune?" if layout["gain"] else "tune?") if layout["short"] else "verdict", no_wrap=True)
    if layout["updated"]:
        table.add_column("updated (UTC)" if layout["updated"] == "full" else "updated", no_wrap=True)
    for run in runs:
        cells = [str(run["id"]), _e(run["name"]), _status_text(run["status"])]
        cells += [_e(run["task_type"])] if layout["task"] else []
        cells += [_e(run["base_model"])] if layout["base"] else []
        cells += [_e(run["primary_metric"])] if show_metric else []
        cells += [_num(run["rung_metrics"].get(rung)) for rung in rungs]
        short = _short_verdict(run["recommend"], run["gain"], layout["gain"])
        cells.append(short if layout["short"] else _verdict_text(run["recommend"], run["gain"]))
        if layout["updated"]:
            cells.append(_time(run["updated_at"]) if layout["updated"] == "full" else _time(run["updated_at"])[5:])
        table.add_row(*cells)
    labels = (("task", "task"), ("base", "base model"), ("updated", "updated"), ("gain", "gain"))
    hidden = [label for key, label in labels if not layout[key]]
    if hidden:
        table.caption = f"not shown at this width: {', '.join(hidden)} (`--format tsv` prints every column)"
        table.caption_justify = "left"
    return table


@runs_app.command("list")
def list_command(
    registry: RegistryOption = None,
    output_format: Annotated[
        ListFormat | None,
        typer.Option("--format", help="table (fitted to the terminal), tsv (tab-separated with a header, full numbers) or json; "
                                      "default: table on a terminal, tsv when the output is piped or redirected."),
    ] = None,
) -> None:
    """List recorded runs with each rung's primary metric and the verdict."""
    import io

    from rich.console import Console

    output_format = output_format or (ListFormat.table if sys.stdout.isatty() else ListFormat.tsv)
    runs = list_runs(registry)
    rungs = _ordered_rungs(*(list(r["rung_metrics"]) for r in runs))
    if output_format is ListFormat.json:
        sys.stdout.write(json.dumps(runs, indent=2) + "\n")
        return
    if output_format is ListFormat.tsv:
        sys.stdout.write(_runs_tsv(runs, rungs))
        if not runs:
            print(f"no runs recorded in {registry_path(registry)} yet; `fmtune run` records each run there.", file=sys.stderr)
        return
    console = Console()
    if not runs:
        console.print(f"no runs recorded in {_e(registry_path(registry))} yet; `fmtune run` records each run there.")
        return
    # A layout fits when every column but the name gets its full width and names get at least NAME_CELLS (longer
    # names fold onto a second line; numbers are never cut).
    from rich.cells import cell_len

    name_excess = max(0, max(cell_len(r["name"]) for r in runs) - NAME_CELLS)
    measuring = Console(file=io.StringIO(), width=100_000)
    tables = [_runs_table(runs, rungs, layout, registry) for layout in _LAYOUTS]
    fitting = [t for t in tables if measuring.measure(t).maximum - name_excess <= console.width]
    console.print(fitting[0] if fitting else tables[-1])


@runs_app.command("show")
def show_command(
    run_ref: Annotated[str, typer.Argument(metavar="RUN", help="Run name, folder or id (see `fmtune runs list`).")],
    registry: RegistryOption = None,
) -> None:
    """Show one run: where it is, its data, base model, ladder with 95% CIs and the verdict."""
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table

    console = Console()
    run = get_run(run_ref, registry)
    report = run["report"] or {}
    task, data, base = report.get("task") or {}, report.get("data") or {}, report.get("base_model") or {}
    metric = run["primary_metric"]

    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    facts.add_row("status", _status_text(run["status"]))
    facts.add_row("run folder", _e(run["run_dir"]))
    facts.add_row("task", f"{_e(run['task_type'])} (primary metric: {_e(metric)})")
    if task.get("labels"):
        facts.add_row("labels", _e(", ".join(map(str, task["labels"]))))
    facts.add_row("base model", _e(run["base_model"]) + (f"  {_e(base['path'])}" if base.get("path") else ""))
    if data:
        counts = ", ".join(f"{split} {data[split]}" for split in ("train", "validation", "test") if split in data)
        facts.add_row("data", f"{counts}  sha256 {(data.get('sha256') or '—')[:16]}")
    run_info = report.get("run") or {}
    if run_info.get("wall_seconds") is not None:
        facts.add_row("wall time", f"{run_info['wall_seconds']:.1f} s")
    facts.add_row("recorded", f"{_time(run['created_at'])}, updated {_time(run['updated_at'])} (UTC), fmtune {run['fmtune_version']}")
    if run.get("work_dir") and run["status"] != "complete":
        facts.add_row("unfinished files", _e(run["work_dir"]))
    console.print(Panel(facts, title=f"run {_e(run['name'])} #{run['id']}", expand=False))

    if report.get("ladder"):
        ladder = Table(title="ladder (held-out test set)")
        ladder.add_column("rung", style="bold", no_wrap=True)
        ladder.add_column(metric or "metric", justify="right")
        ladder.add_column("95% CI", no_wrap=True)
        ladder.add_column("other metrics")
        ladder.add_column("train n", justify="right")
        ladder.add_column("train s", justify="right")
        for rung in report["ladder"]:
            metrics = rung.get("metrics") or {}
            others = ", ".join(f"{k} {_num(v)}" for k, v in metrics.items() if k != metric and isinstance(v, (int, float)))
            ladder.add_row(
                _e(rung.get("name", "?")), _num(metrics.get(metric)), _ci((rung.get("ci95") or {}).get(metric)), others,
                str(rung.get("train_examples", "—")), _num(rung.get("train_seconds"), 1),
            )
        console.print(ladder)

    verdict = report.get("verdict") or {}
    if verdict:
        lines = [_e(verdict["headline"]) if verdict.get("headline") else _verdict_text(run["recommend"], run["gain"])]
        lines += [f"• {_e(reason)}" for reason in verdict.get("reasons") or []]
        for key, label in (("retention", "retention"), ("domain_shift", "domain shift")):
            section = report.get(key) or {}
            if key == "retention" and section:
                lines.append(f"{label}: base {_num(section.get('base'))} → tuned {_num(section.get('fine_tuned'))} ({_signed(section.get('relative_change'))} relative)")
            elif section:
                lines.append(f"{label}: {_num(section.get('score'))}, {_e(section.get('interpretation', ''))}")
        cost = report.get("cost") or {}
        if cost.get("train_seconds") is not None:
            lines.append(f"cost: {cost['train_seconds']:.1f} s of training on {_e(cost.get('hardware', '?'))}")
        console.print(Panel("\n".join(lines), title="verdict", expand=False))


@runs_app.command("compare")
def compare_command(
    a: Annotated[str, typer.Argument(help="First run (the reference): a name, folder or id.")],
    b: Annotated[str, typer.Argument(help="Second run (name, folder or id); deltas are b - a.")],
    registry: RegistryOption = None,
) -> None:
    """Compare two runs rung by rung on the primary metric (delta = b - a)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    cmp = compare_runs(a, b, registry)
    table = Table(title=f"{_e(cmp['a'])} vs {_e(cmp['b'])} ({_e(cmp['metric'])}, held-out test set)")
    table.add_column("", style="bold")
    table.add_column(f"{_e(cmp['a'])} #{cmp['id']['a']}", no_wrap=True)
    table.add_column(f"{_e(cmp['b'])} #{cmp['id']['b']}", no_wrap=True)
    table.add_column("delta (b - a)", justify="right")
    for label, key in (("task", "task"), ("base model", "base_model"), ("status", "status")):
        table.add_row(label, _e(cmp[key]["a"]), _e(cmp[key]["b"]), "")
    same = "[green]same data[/green]" if cmp["same_data"] else "[yellow]different data[/yellow]"
    table.add_row("data sha256", (cmp["data_sha256"]["a"] or "—")[:16], (cmp["data_sha256"]["b"] or "—")[:16], same)
    table.add_section()
    for rung in cmp["rungs"]:
        table.add_row(
            _e(rung["name"]), f"{_num(rung['a'])} {_ci(rung['a_ci95'])}".strip(), f"{_num(rung['b'])} {_ci(rung['b_ci95'])}".strip(),
            _signed(rung["delta"]),
        )
    table.add_section()
    va, vb = cmp["verdict"]["a"], cmp["verdict"]["b"]
    table.add_row("verdict", _verdict_text(va["recommend"], va["gain"]), _verdict_text(vb["recommend"], vb["gain"]), "")
    console.print(table)
    for side in ("a", "b"):
        console.print(f"{side}: #{cmp['id'][side]} {_e(cmp['run_dir'][side])}", highlight=False)
    for note in cmp["notes"]:
        console.print(f"[yellow]note:[/yellow] {_e(note)}")


@runs_app.command("export")
def export_command(
    ref: Annotated[str, typer.Argument(help="The run: a name, folder or id.")],
    to: Annotated[str, typer.Option("--to", help="mlflow (MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME, as MLflow reads them) or tensorboard (event files in --logdir).")],
    logdir: Annotated[Path | None, typer.Option(help="TensorBoard: the folder for the event files (default: tensorboard/<run name>); never the run folder, which its manifest seals.")] = None,
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME, else 'fmtune').")] = None,
    registry: RegistryOption = None,
) -> None:
    """Send a finished run to an experiment tracker: its config, every rung's metrics with CIs, the per-epoch history,
    the verdict, and (MLflow) report.html and the model as artifacts."""
    import yaml

    from fmtune.store import tracking

    if to not in tracking.TRACKERS:
        raise FmtuneError(f"--to {to}: choose mlflow or tensorboard.")
    run = get_run(ref, registry)
    run_dir = Path(run["run_dir"])
    if run.get("status") != "complete" or not (run_dir / "report.json").is_file():
        raise FmtuneError(f"run {ref!r} ({run_dir}) is not a complete run folder with a report.json; only finished runs are exported.")
    report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) if (run_dir / "config.yaml").is_file() else {}
    if to == "mlflow":
        sent = tracking.to_mlflow(run_dir, report, config, experiment=experiment)
        print(f"exported {run_dir} to {tracking.summary({'mlflow': sent})}")
        return
    target = logdir or Path("tensorboard") / str(run.get("name") or run_dir.name)
    if target.resolve() == run_dir.resolve() or run_dir.resolve() in target.resolve().parents:
        raise FmtuneError(f"--logdir {target}: inside the run folder, whose manifest covers every file; pick a folder outside it.")
    written = tracking.to_tensorboard(target, report, config)
    print(f"exported {run_dir} to {tracking.summary({'tensorboard': written})}")


def verify_command(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by `fmtune run` (holds manifest.json).")],
    check_inputs: Annotated[
        bool, typer.Option("--inputs/--no-inputs", help="Also re-hash the input data files and the base model when they still exist.")
    ] = True,
    key_file: Annotated[
        Path | None,
        typer.Option("--key-file", help="File holding the secret the manifest was signed with (default: $FMTUNE_MANIFEST_KEY); "
                                        "checks the manifest's HMAC-SHA256 signature."),
    ] = None,
) -> None:
    """Re-hash a run's model, model card, reports, config and logs (and its inputs) and check them against manifest.json."""
    from rich.console import Console
    from rich.markup import escape

    from fmtune.store.lineage import KEY_ENV_VAR, check_run, manifest_key

    console = Console(highlight=False)
    result = check_run(run_dir, check_inputs=check_inputs, key=manifest_key(key_file))
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    if result.problems:
        for problem in result.problems:
            console.print(f"[red]{escape(problem)}[/red]", soft_wrap=True)
        console.print(f"[red]{len(result.problems)} problem(s): {run_dir} does not match its manifest[/red]")
        raise typer.Exit(1)
    console.print(f"verified: {result.checked} files match the manifest")
    signature = {
        "valid": "signature: valid (HMAC-SHA256 with the given key): the manifest is as it was signed",
        "unchecked": "[yellow]signature: not checked[/yellow]: the manifest is signed, but no key was given "
                     f"(set ${KEY_ENV_VAR} or pass --key-file)",
        "unsigned": "[yellow]signature: none[/yellow]: the manifest is not signed, so a change made to a file and to the manifest "
                    f"together would pass (sign runs by setting ${KEY_ENV_VAR} when they are written)",
    }[result.signature]
    console.print(signature)
