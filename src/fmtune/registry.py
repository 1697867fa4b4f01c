"""The run registry: one embedded SQLite file that remembers every run, so runs can be listed and compared.

The file is shared by concurrent runs: WAL journal, a 30 s busy timeout and one short `BEGIN IMMEDIATE`
transaction per write keep writers from corrupting it or failing on a lock.
"""

from __future__ import annotations

import difflib
import json
import os
import sqlite3
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any

import typer

from fmtune import __version__
from fmtune.errors import FmtuneError

SCHEMA_VERSION = 1
STATUSES = ("running", "complete", "interrupted", "failed")
RUNG_ORDER = ("zero_shot", "few_shot", "head_only", "fine_tuned", "from_scratch")
BUSY_TIMEOUT_S = 30.0
ENV_VAR = "FMTUNE_REGISTRY"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    name            TEXT PRIMARY KEY,
    run_dir         TEXT NOT NULL,
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
"""
_SUMMARY_COLUMNS = (
    "name, run_dir, status, task_type, base_model, primary_metric, rung_metrics, recommend, gain, "
    "data_sha256, created_at, updated_at, fmtune_version"
)

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


def _connect(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) the registry in WAL mode with the schema in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("BEGIN IMMEDIATE")
        for statement in filter(str.strip, _SCHEMA.split(";")):
            conn.execute(statement)
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        if row is None:
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        conn.execute("COMMIT")
    except sqlite3.DatabaseError as e:
        conn.close()
        raise FmtuneError(f"{path}: cannot open the run registry ({e}); pass --registry or set ${ENV_VAR} to another file.") from e
    if row is not None and row[0] > SCHEMA_VERSION:
        conn.close()
        raise FmtuneError(
            f"{path}: the run registry has schema version {row[0]}, written by a newer fmtune (this one reads {SCHEMA_VERSION}); "
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


def record_run(run_dir: Path, report: dict | None, status: str, db: Path | None = None) -> None:
    """Insert or update the run named report["run"]["name"] (else the folder's name) with this status and report.

    Every column but created_at is replaced, so a re-run under the same name does not keep stale results.
    """
    if status not in STATUSES:
        raise ValueError(f"record_run: status {status!r} is not one of {STATUSES}")
    name = ((report or {}).get("run") or {}).get("name") or Path(run_dir).name
    row = {"name": name, "run_dir": str(Path(run_dir).resolve()), "status": status, **_summary(report)}
    now = _now()
    columns = [*row, "created_at", "updated_at"]
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in ("name", "created_at"))
    sql = (
        f"INSERT INTO runs ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)}) "
        f"ON CONFLICT(name) DO UPDATE SET {updates}"
    )
    with closing(_connect(registry_path(db))) as conn:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(sql, [*row.values(), now, now])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


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
        rows = conn.execute(f"SELECT {_SUMMARY_COLUMNS} FROM runs ORDER BY updated_at DESC, name").fetchall()
    return [_decode(r) for r in rows]


def get_run(name: str, db: Path | None = None) -> dict:
    """One run with its full report (key "report"); an unknown name is an FmtuneError that names close matches."""
    path = registry_path(db)
    row, names = None, []
    if path.exists():
        with closing(_connect(path)) as conn:
            row = conn.execute(f"SELECT {_SUMMARY_COLUMNS}, report FROM runs WHERE name = ?", (name,)).fetchone()
            if row is None:
                names = [r[0] for r in conn.execute("SELECT name FROM runs ORDER BY name")]
    if row is not None:
        return _decode(row)
    if not names:
        raise FmtuneError(f"no run named {name!r}: the registry {path} is empty; `fmtune run` records each run there.")
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else f"known runs: {', '.join(names[:10])}"
    raise FmtuneError(f"no run named {name!r} in the registry {path}; {hint} (`fmtune runs list` shows them all)")


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
    """Runs a and b side by side: task, base model, data, each rung's primary metric with 95% CI, delta b - a, verdicts."""
    run_a, run_b = get_run(a, db), get_run(b, db)
    metric = run_a["primary_metric"] or run_b["primary_metric"]
    notes = []
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


@runs_app.command("list")
def list_command(registry: RegistryOption = None) -> None:
    """List recorded runs with each rung's primary metric and the verdict."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    runs = list_runs(registry)
    if not runs:
        console.print(f"no runs recorded in {registry_path(registry)} yet; `fmtune run` records each run there.")
        return
    rungs = _ordered_rungs(*(list(r["rung_metrics"]) for r in runs))
    table = Table(title=f"runs in {registry_path(registry)}")
    table.add_column("name", no_wrap=True, style="bold")
    for column in ("status", "task", "base model", "metric"):
        table.add_column(column)
    for rung in rungs:
        table.add_column(rung, justify="right")
    table.add_column("verdict")
    table.add_column("updated (UTC)", no_wrap=True)
    for run in runs:
        table.add_row(
            _e(run["name"]), _status_text(run["status"]), _e(run["task_type"]), _e(run["base_model"]),
            _e(run["primary_metric"]), *(_num(run["rung_metrics"].get(rung)) for rung in rungs),
            _verdict_text(run["recommend"], run["gain"]), _time(run["updated_at"]),
        )
    console.print(table)


@runs_app.command("show")
def show_command(name: Annotated[str, typer.Argument(help="Run name (see `fmtune runs list`).")], registry: RegistryOption = None) -> None:
    """Show one run: where it is, its data, base model, ladder with 95% CIs and the verdict."""
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table

    console = Console()
    run = get_run(name, registry)
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
    console.print(Panel(facts, title=f"run {_e(run['name'])}", expand=False))

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
    a: Annotated[str, typer.Argument(help="First run (the reference).")],
    b: Annotated[str, typer.Argument(help="Second run; deltas are b - a.")],
    registry: RegistryOption = None,
) -> None:
    """Compare two runs rung by rung on the primary metric (delta = b - a)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    cmp = compare_runs(a, b, registry)
    table = Table(title=f"{_e(cmp['a'])} vs {_e(cmp['b'])} ({_e(cmp['metric'])}, held-out test set)")
    table.add_column("", style="bold")
    table.add_column(_e(cmp["a"]), no_wrap=True)
    table.add_column(_e(cmp["b"]), no_wrap=True)
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
    for note in cmp["notes"]:
        console.print(f"[yellow]note:[/yellow] {_e(note)}")


def verify_command(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by `fmtune run` (holds manifest.json).")],
    check_inputs: Annotated[
        bool, typer.Option("--inputs/--no-inputs", help="Also re-hash the input data files and the base model when they still exist.")
    ] = True,
) -> None:
    """Re-hash a run's model, report and config (and its inputs) and check them against manifest.json."""
    from rich.console import Console
    from rich.markup import escape

    from fmtune.lineage import check_run

    console = Console(highlight=False)
    result = check_run(run_dir, check_inputs=check_inputs)
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    if result.problems:
        for problem in result.problems:
            console.print(f"[red]{escape(problem)}[/red]", soft_wrap=True)
        console.print(f"[red]{len(result.problems)} problem(s): {run_dir} does not match its manifest[/red]")
        raise typer.Exit(1)
    console.print(f"verified: {result.checked} files match the manifest")
