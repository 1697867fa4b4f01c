"""What a run shows on the console: stage lines with their times, progress bars, the summary at the end (ladder,
audit warnings, verdict), and the gate that can fail a finished run."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from fmtune.errors import FmtuneError

console = Console(stderr=True)


class GateFailed(FmtuneError):
    """The run finished but failed a gate the user set (e.g. --max-forgetting)."""


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
    )


@contextlib.contextmanager
def stage(name: str, log: list[str]):
    """Print a line when a stage ends, with its wall time; keep it for logs/run.log."""
    start = time.perf_counter()
    console.print(f"[cyan]>[/] {name} ...")
    yield
    line = f"{name}: {time.perf_counter() - start:.1f} s"
    log.append(line)
    console.print(f"[green]✓[/] {line}")


def raise_if_gate_failed(report: dict, out: Path) -> None:
    """After the summary is printed: GateFailed (exit 3) when the run failed a gate the user set (--max-forgetting)."""
    from fmtune import retention

    gates = report["verdict"].get("gates") or {}
    if not gates.get("passed", True):
        raise GateFailed(retention.gate_failure(report["retention"], gates["max_forgetting"], out))


def print_audit_warnings(warnings: list[str], out_console: Console) -> None:
    """Every audit finding (leakage, duplicates, personal data, unreadable or truncated texts, ...) in one block on the
    console: a warning that lives only inside report.json is a warning nobody reads."""
    if not warnings:
        return
    from rich.markup import escape

    out_console.print(f"[bold yellow]Data audit: {len(warnings)} warning(s)[/] (details under data.audit in report.json)")
    for w in warnings:
        out_console.print(f"  [yellow]![/] {escape(w)}")


def print_summary(report: dict, out: Path) -> None:
    primary = report["task"]["primary_metric"]
    second = next((m for m in ("accuracy", "token_f1", "exact_match", "perplexity") if m != primary and m in report["ladder"][0]["metrics"]), None)
    table = Table(title=f"fmtune ladder — {report['run']['name']} (test n={report['data']['test']})")
    for col in ("rung", primary, "95% CI", second or "", "train examples", "train s"):
        table.add_column(col, justify="left" if col == "rung" else "right")
    for r in report["ladder"]:
        lo, hi = r["ci95"][primary]
        other = f"{r['metrics'][second]:.3f}" if second and second in r["metrics"] else ""
        table.add_row(r["name"], f"{r['metrics'][primary]:.3f}", f"{lo:.3f}–{hi:.3f}", other, str(r["train_examples"]), f"{r['train_seconds']:.1f}")
    out_console = Console()
    out_console.print(table)
    print_audit_warnings(((report.get("data") or {}).get("audit") or {}).get("warnings") or [], out_console)
    v = report["verdict"]
    out_console.print(f"[bold]{'RECOMMEND' if v['recommend_fine_tuning'] else 'DO NOT RECOMMEND'} fine-tuning.[/] {v['headline']}")
    out_console.print(f"Report: {out / 'report.html'}  ·  {out / 'report.json'}  ·  model: {out / 'model'}  (wall {report['run']['wall_seconds']:.0f} s)")
