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

import fmtune
from test_generation import colour_pairs, make_tiny_llama, write_jsonl

KEY = "test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}


def fmtune_cli(*args, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fmtune.cli", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- usage errors: usage + one line, exit 2
@pytest.mark.parametrize(("args", "error"), [
    (["predict"], "Missing argument 'run_dir'"),
    (["bogus"], "No such command 'bogus'"),
    (["runs", "show"], "Missing argument 'RUN'"),
    (["predict", "--bogus", "x"], "No such option: --bogus"),
    (["run", "--bogus"], "No such option '--bogus'"),
])
def test_usage_errors_print_usage_and_one_error_line_and_exit_2(args, error):
    proc = fmtune_cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("Usage: ") and "--help" in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and error in errors[0], proc.stderr


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
    names = ["uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi", "fmtune", "fmtune.serve"]
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

    from fmtune import cli, models

    # loading measures whether bf16 pays on this CPU (seconds of BERT steps on a busy machine): not what is tested here
    monkeypatch.setattr(models, "bf16_speedup", lambda: 1.0)
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
