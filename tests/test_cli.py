"""The command line as users meet it: usage errors, --version, and `fmtune serve` on a generation run."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_generation import colour_pairs, make_tiny_llama, write_jsonl

import fmtune

KEY = "test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}


def fmtune_cli(*args, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fmtune.cli", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- usage errors: usage + one line, exit 2
@pytest.mark.parametrize(("args", "error"), [
    (["predict"], "Missing argument 'run_dir'"),
    (["bogus"], "No such command 'bogus'"),
    (["runs", "show"], "Missing argument 'RUN'"),
    (["predict", "--bogus", "x"], "No such option"),  # click words it "No such option: --bogus" or "No such option '--bogus'" by version
    (["run", "--bogus"], "No such option"),
])
def test_usage_errors_print_usage_and_one_error_line_and_exit_2(args, error):
    proc = fmtune_cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("Usage: ") and "--help" in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and error in errors[0], proc.stderr
    assert "--bogus" in errors[0] or "--bogus" not in args


@pytest.mark.parametrize("args", [[], ["runs"]])
def test_a_command_group_without_a_command_prints_its_help(args):
    proc = fmtune_cli(*args)
    assert proc.returncode in (0, 2), proc.stderr
    assert "Traceback" not in proc.stderr
    assert "Usage: " in proc.stdout + proc.stderr and "Commands" in proc.stdout + proc.stderr


# --------------------------------------------------------------------------- --version
def test_version_prints_the_package_version():
    proc = fmtune_cli("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"fmtune {fmtune.__version__}\n" and proc.stderr == ""


def test_version_imports_nothing_heavy():
    code = (
        "import sys\n"
        "sys.argv = ['fmtune', '--version']\n"
        "from fmtune.cli import main\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
        "print(sorted(m for m in ('torch', 'transformers', 'fastapi', 'uvicorn', 'pandas', 'numpy', 'sklearn') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"fmtune {fmtune.__version__}", "[]"]


# --------------------------------------------------------------------------- `fmtune serve` on a generation run
@pytest.fixture(scope="module")
def generation_run(tmp_path_factory) -> Path:
    """A finished generation run folder, made by `fmtune run` on a tiny random Llama (about 15 s)."""
    work = tmp_path_factory.mktemp("gen-serve")
    tiny = make_tiny_llama(work / "tiny-llama")
    data = write_jsonl(work / "colours.jsonl", colour_pairs(40))
    env = {**os.environ, "FMTUNE_REGISTRY": str(work / "registry.sqlite"), "FMTUNE_CACHE": str(work / "cache")}
    proc = subprocess.run([sys.executable, "-m", "fmtune.cli", "run", "--data", str(data), "--model", str(tiny), "--task", "generation",
                           "--out", str(work / "runs" / "gen"), "--name", "gen", "--epochs", "1", "--bootstrap", "100", "--latency-repeats", "3",
                           "--max-new-tokens", "3", "--few-shot-k", "1", "--no-curve"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work / "runs" / "gen"


@contextlib.contextmanager
def kept_logging():
    """serve() applies uvicorn's logging config: put the loggers back as they were for the other tests."""
    names = ["uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi", "fmtune", "fmtune.serving.serve"]
    saved = {n: (lg.handlers[:], lg.filters[:], lg.level, lg.propagate, lg.disabled) for n in names for lg in [logging.getLogger(n)]}
    try:
        yield
    finally:
        for n, (handlers, filters, level, propagate, disabled) in saved.items():
            lg = logging.getLogger(n)
            lg.handlers[:], lg.filters[:], lg.level, lg.propagate, lg.disabled = handlers, filters, level, propagate, disabled


def serve_through_the_cli(run_dir: Path, tmp_path: Path, monkeypatch) -> dict:
    """`fmtune serve RUN_DIR --api-key-file FILE` in this process, with uvicorn.run replaced: what it would have served."""
    import uvicorn

    from fmtune import cli
    from fmtune.models import loading

    # loading measures whether bf16 pays on this CPU (seconds of BERT steps on a busy machine): not what is tested here
    monkeypatch.setattr(loading, "bf16_speedup", lambda: 1.0)
    served: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.update(app=app, **kwargs))
    monkeypatch.delenv("FMTUNE_API_KEYS", raising=False)
    (tmp_path / "keys").write_text(KEY + "\n")
    monkeypatch.setattr(sys, "argv", ["fmtune", "serve", str(run_dir), "--api-key-file", str(tmp_path / "keys"), "--port", "8123"])
    with kept_logging():
        cli.main()
    assert served["port"] == 8123
    return served


def test_serve_on_a_generation_run_answers_v1_generate(generation_run, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    app = serve_through_the_cli(generation_run, tmp_path, monkeypatch)["app"]
    with TestClient(app) as client:
        r = client.post("/v1/generate", json={"prompts": ["what colour is the red fox", "what colour is the blue cat"], "max_new_tokens": 3}, headers=AUTH)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "gen" and len(body["completions"]) == 2
        assert all(isinstance(c, str) and len(c.split()) <= 3 for c in body["completions"])
        assert client.post("/v1/generate", json={"prompts": ["hi"]}).status_code == 401
        r = client.post("/v1/predict", json={"texts": ["hi"]}, headers=AUTH)
        assert r.status_code == 404 and r.json()["detail"] == "this run is a generation model; use /v1/generate"
        info = client.get("/v1/model", headers=AUTH).json()
        assert info["task"] == "generation" and info["primary_metric"] == json.loads((generation_run / "report.json").read_text())["task"]["primary_metric"]


# --------------------------------------------------------------------------- console output: the "fmtune" logger
def test_a_cli_run_shows_its_stage_lines_on_stderr_and_the_ladder_on_stdout(tmp_path, tiny_bert):
    from conftest import make_reviews, write_csv

    data = write_csv(tmp_path / "reviews.csv", make_reviews(80))
    env = {**os.environ, "FMTUNE_REGISTRY": str(tmp_path / "registry.sqlite")}
    proc = subprocess.run([sys.executable, "-m", "fmtune.cli", "run", "--data", str(data), "--model", str(tiny_bert), "--out", "runs/c",
                           "--epochs", "1", "--no-curve", "--rungs", "zero_shot,fine_tuned", "--bootstrap", "100", "--latency-repeats", "3"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "> rung fine_tuned (full) ..." in proc.stderr and "✓ rung fine_tuned (full):" in proc.stderr, proc.stderr
    assert "[cyan]" not in proc.stderr and "INFO" not in proc.stderr, "rendered as before: no markup, no level, no time"
    assert "rung fine_tuned" not in proc.stdout and "fmtune ladder" in proc.stdout and "Report:" in proc.stdout


@pytest.fixture()
def fmtune_logger():
    """The "fmtune" logger with no handler of its own, put back as it was afterwards."""
    lg = logging.getLogger("fmtune")
    saved = lg.handlers[:], lg.level, lg.propagate
    lg.handlers[:] = []
    try:
        yield lg
    finally:
        lg.handlers[:], lg.level, lg.propagate = saved


def test_console_print_logs_plain_text_with_its_markup_for_the_rich_handler(fmtune_logger, caplog):
    from rich.console import Console

    from fmtune.console import ConsoleHandler, console

    caplog.set_level(logging.INFO, logger="fmtune")
    console.print("[yellow]note:[/] a [bold]thing[/] [1] in runs/a[0-9]")  # [1] and [0-9]: not markup; a plain handler keeps them
    console.print("[yellow]warning:[/] could not record the run in the registry (disk full).")
    record, warning = caplog.records
    assert record.getMessage() == "note: a thing [1] in runs/a[0-9]" and record.levelno == logging.INFO
    assert warning.levelno == logging.WARNING and warning.getMessage().startswith("warning: could not record")
    shown = Console(record=True, width=200, color_system=None)
    ConsoleHandler(shown).handle(record)
    assert shown.export_text() == "note: a thing [1] in runs/a[0-9]\n"


def test_quiet_and_a_silenced_logger_print_nothing_and_draw_no_bar(fmtune_logger, capsys):
    from rich.progress import Progress

    from fmtune.console import NoProgress, console, install_console_handler, progress_bar

    assert isinstance(progress_bar(), NoProgress), "no rich handler: nobody would see the bar"
    install_console_handler()
    assert fmtune_logger.propagate is False and fmtune_logger.level == logging.INFO
    assert isinstance(progress_bar(), Progress)
    console.print("[cyan]>[/] shown")
    fmtune_logger.setLevel(logging.WARNING)
    console.print("[cyan]>[/] silenced")
    with progress_bar() as prog:  # the calls the tasks make, on the bar nobody sees
        assert isinstance(prog, NoProgress)
        task = prog.add_task("training", total=3, info="")
        prog.advance(task, 1)
        prog.update(task, info="epoch 1")
        prog.console.print("  epoch 1 val macro-F1 0.5")
    fmtune_logger.setLevel(logging.INFO)
    console.quiet = True
    try:
        console.print("[cyan]>[/] quiet")
        assert isinstance(progress_bar(), NoProgress)
    finally:
        console.quiet = False
    err = capsys.readouterr().err
    assert "> shown" in err and "silenced" not in err and "epoch 1" not in err and "quiet" not in err, err
