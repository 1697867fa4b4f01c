"""The Python API: fmtune.run(...) -> RunResult, fmtune.load(run_dir) -> a predictor; the README's example runs as written."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

import fmtune
from fmtune.errors import ConfigError

README = Path(__file__).parents[1] / "README.md"


def test_run_returns_the_ladder_and_verdict_and_load_predicts(tmp_path, tiny_bert, monkeypatch, capsys):
    from conftest import make_reviews, write_csv

    monkeypatch.chdir(tmp_path)
    data = write_csv(tmp_path / "reviews.csv", make_reviews(120))
    result = fmtune.run(data=data, model=str(tiny_bert), out="runs/api", epochs=2, curve=False, rungs=["zero_shot", "few_shot", "fine_tuned"],
                        learning_rate=3e-3, bootstrap=100, latency_repeats=3, quiet=True)
    assert result.run_dir == Path("runs/api") and result.report_html.is_file() and result.model_dir.is_dir()
    assert [r.name for r in result.ladder] == ["zero_shot", "few_shot", "fine_tuned"]
    assert result.primary_metric == "macro_f1" and result.rung("fine_tuned").value == result.report["ladder"][2]["metrics"]["macro_f1"]
    assert result.verdict.headline == result.report["verdict"]["headline"] and len(result.verdict.gain_ci95) == 2
    captured = capsys.readouterr()
    assert "fmtune ladder" not in captured.out and "rung fine_tuned" not in captured.err, "quiet=True prints nothing"
    predictions = fmtune.load(result.run_dir).predict(["good great fun", "awful dull mess"])
    assert [set(p["probabilities"]) for p in predictions] == [{"pos", "neg"}] * 2


def test_run_validates_options_like_the_cli(tmp_path):
    with pytest.raises(ConfigError) as err:
        fmtune.run(data=tmp_path / "missing.csv", epocs=3)
    assert "unknown option '--epocs'. Did you mean 'epochs'?" in str(err.value)
    with pytest.raises(ConfigError, match="file not found"):
        fmtune.run(data=tmp_path / "missing.csv", epochs=3)


TINY = dict(epochs=1, curve=False, rungs=["zero_shot", "fine_tuned"], bootstrap=100, latency_repeats=3)


def fmtune_logger_state() -> tuple:
    lg = logging.getLogger("fmtune")
    return lg.handlers[:], lg.level, lg.propagate


def test_the_fmtune_logger_level_silences_the_console(tmp_path, tiny_bert, monkeypatch, capfd):
    from conftest import make_reviews, write_csv

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(logging.getLogger("fmtune"), "level", logging.WARNING)
    data = write_csv(tmp_path / "reviews.csv", make_reviews(80))
    fmtune.run(data=data, model=str(tiny_bert), out="runs/q", **TINY)
    captured = capfd.readouterr()  # the file descriptors: nothing from fmtune, a progress bar or the ladder table
    assert captured.out == "" and captured.err == "", captured


def test_by_default_the_stage_lines_reach_stderr_and_the_logger_is_left_as_it_was(tmp_path, tiny_bert, monkeypatch, capsys):
    from conftest import make_reviews, write_csv

    monkeypatch.chdir(tmp_path)
    before = fmtune_logger_state()
    assert not before[0], "another test left a handler on the fmtune logger"
    data = write_csv(tmp_path / "reviews.csv", make_reviews(80))
    fmtune.run(data=data, model=str(tiny_bert), out="runs/d", **TINY)
    captured = capsys.readouterr()
    assert "✓ rung fine_tuned" in captured.err and "> save model ..." in captured.err, captured.err
    assert "[green]" not in captured.err and "rung fine_tuned" not in captured.out
    assert "fmtune ladder" in captured.out and "RECOMMEND" in captured.out
    assert fmtune_logger_state() == before, "the console handler fmtune.run attached is taken off afterwards"


def test_a_handler_of_your_own_receives_plain_text_and_nothing_is_printed(tmp_path, tiny_bert, monkeypatch, capsys):
    from conftest import make_reviews, write_csv

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__()
            self.lines: list[str] = []

        def emit(self, record):
            self.lines.append(self.format(record))

    monkeypatch.chdir(tmp_path)
    lg, mine = logging.getLogger("fmtune"), Collect()
    monkeypatch.setattr(lg, "level", logging.INFO)
    monkeypatch.setattr(lg, "propagate", False)
    monkeypatch.setattr(lg, "handlers", [mine])
    data = write_csv(tmp_path / "reviews.csv", make_reviews(80))
    fmtune.run(data=data, model=str(tiny_bert), out="runs/h", **TINY)
    assert lg.handlers == [mine], "fmtune.run adds no handler next to yours"
    assert any(line.startswith("✓ rung fine_tuned") for line in mine.lines), mine.lines
    assert not [line for line in mine.lines if "[/]" in line or "[cyan]" in line], "markup is stripped for plain handlers"
    assert "rung" not in capsys.readouterr().err


@pytest.mark.integration
def test_the_readme_example_runs_as_written(tmp_path, monkeypatch, capsys):
    """The README's Python example, verbatim, on quickstart snippets written as reviews.csv, with the packaged MiniLM."""
    import shutil

    from fmtune.data.quickstart import rotten_tomatoes_csv

    code = re.search(r"## Python API\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    shutil.copy(rotten_tomatoes_csv(300, 0), tmp_path / "reviews.csv")
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "Fine-tuning" in out and "fine_tuned" in out and "probabilities" in out
    assert (tmp_path / "runs" / "notebook" / "report.json").is_file()
