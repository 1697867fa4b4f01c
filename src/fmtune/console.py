"""What a run shows on the console: stage lines with their times, progress bars, the summary at the end (ladder,
audit warnings, verdict), and the gate that can fail a finished run.

Everything but the summary goes through the standard `logging` logger "fmtune", so a library user silences it with
`logging.getLogger("fmtune").setLevel(logging.WARNING)` or routes it to their own handlers. `console.print(markup)`
logs one record: its message is the plain text (for any handler), the rich markup rides along for ConsoleHandler,
which the CLI (and a default fmtune.run) puts on the logger to show the lines as rich text on stderr. The summary is
the command's output, on stdout (print_summary)."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from rich.console import Console

logger = logging.getLogger("fmtune")


class ConsoleLog:
    """`console.print(...)` as the stages call it, with rich markup, logged on "fmtune": INFO, or WARNING for a line
    whose text starts with "warning:". `quiet` (other ranks than the main one; fmtune.run(quiet=True)) drops it all."""

    def __init__(self) -> None:
        self.quiet = False

    def print(self, *objects: Any, **kwargs: Any) -> None:
        if self.quiet or not logger.isEnabledFor(logging.WARNING):
            return
        text = _plain(objects)
        level = logging.WARNING if text.lstrip().lower().startswith("warning:") else logging.INFO
        logger.log(level, text, extra={"rich_objects": objects, "rich_kwargs": kwargs}, stacklevel=2)


console = ConsoleLog()


def _plain(objects: tuple[Any, ...]) -> str:
    """What `objects` say without their markup, for handlers that are not rich (a file, a notebook's own logging)."""
    import io

    from rich.errors import MarkupError
    from rich.text import Text

    parts = []
    for obj in objects:
        if isinstance(obj, str):
            try:
                parts.append(Text.from_markup(obj).plain)
            except MarkupError:
                parts.append(obj)
        else:  # a table or panel: its text, as a plain 100-column console draws it
            plain = Console(file=io.StringIO(), width=100, color_system=None)
            plain.print(obj)
            parts.append(plain.file.getvalue().rstrip("\n"))
    return " ".join(parts)


class ConsoleHandler(logging.Handler):
    """Shows the "fmtune" records as rich text on stderr, without time or level: as the console has always looked. A
    record logged without markup (say fmtune.runner.report_html's) shows its message, after "warning:" at WARNING and above."""

    def __init__(self, out: Console | None = None) -> None:
        super().__init__()
        self.console = out or Console(stderr=True)

    def emit(self, record: logging.LogRecord) -> None:
        from rich.errors import MarkupError
        from rich.markup import escape

        try:
            objects = getattr(record, "rich_objects", None)
            if objects is not None:
                try:
                    return self.console.print(*objects, **getattr(record, "rich_kwargs", {}))
                except MarkupError:  # a bracket in a path or message that is not markup: the plain text instead
                    return self.console.print(escape(record.getMessage()), highlight=False)
            prefix = f"[yellow]{record.levelname.lower()}:[/] " if record.levelno >= logging.WARNING else ""
            self.console.print(prefix + escape(self.format(record)), highlight=False)
        except Exception:
            self.handleError(record)


def install_console_handler() -> ConsoleHandler:
    """The CLI's console: a ConsoleHandler on "fmtune" at INFO, not also passed on to the root logger's handlers."""
    handler = next((h for h in logger.handlers if isinstance(h, ConsoleHandler)), None) or ConsoleHandler()
    if handler not in logger.handlers:
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return handler


def _live_console() -> Console | None:
    """The rich console that shows fmtune's INFO lines (a ConsoleHandler's or a rich.logging.RichHandler's), if any:
    a live progress bar draws there, and only there."""
    if console.quiet or not logger.isEnabledFor(logging.INFO):
        return None
    current: logging.Logger | None = logger
    while current is not None:
        for h in current.handlers:
            if h.level <= logging.INFO and isinstance(getattr(h, "console", None), Console):
                return h.console
        current = current.parent if current.propagate else None
    return None


class NoProgress:
    """A progress bar nobody sees (quiet, silenced, or no rich handler): takes the same calls and draws nothing.
    `.console.print` still logs, like console.print."""

    console = console

    def __enter__(self) -> "NoProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def add_task(self, description: str, total: float | None = 100.0, **fields: Any) -> int:
        return 0

    def advance(self, task_id: int, advance: float = 1) -> None:
        return None

    def update(self, task_id: int, **kwargs: Any) -> None:
        return None


def progress_bar():
    """A live rich Progress on the console that shows fmtune's lines; a NoProgress when no such console is listening."""
    out = _live_console()
    if out is None:
        return NoProgress()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=out, transient=True,
    )


@contextlib.contextmanager
def stage(name: str, profile: list[dict]):
    """Print a line when a stage ends, with its wall time, and append the stage to `profile` (report.json's
    run.profile; stage_lines gives run.stages and logs/run.log): its wall and CPU seconds (every thread of this
    process), the bytes it wrote (Linux) and the process's peak resident memory so far."""
    start, cpu = time.perf_counter(), time.process_time()
    written = disk_io()
    console.print(f"[cyan]>[/] {name} ...")
    yield
    seconds = time.perf_counter() - start
    after = disk_io()
    profile.append({"stage": name, "seconds": round(seconds, 3), "cpu_seconds": round(time.process_time() - cpu, 3),
                    "written_bytes": None if written is None or after is None else after.get("write_bytes", 0) - written.get("write_bytes", 0), "peak_rss_mb": _peak_rss_mb()})
    console.print(f"[green]✓[/] {name}: {seconds:.1f} s")


def stage_lines(profile: list[dict]) -> list[str]:
    """One line per stage, as the console printed it: 'name: 12.3 s'."""
    return [f"{p['stage']}: {p['seconds']:.1f} s" for p in profile]


def disk_io() -> dict[str, int] | None:
    """This process's bytes written so far: `write_bytes` reached the storage layer, `wchar` passed to write() (Linux)."""
    try:
        fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    except (OSError, ValueError):
        return None
    return {k: int(fields[k]) for k in ("write_bytes", "wchar", "cancelled_write_bytes") if k in fields}


def _peak_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: kilobytes


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
    """The ladder table, the audit warnings and the verdict on stdout: the command's output, not a log line."""
    from rich.table import Table

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
