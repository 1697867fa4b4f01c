"""The run registry: record, list, show and compare runs; concurrent writers; the `runs` and `verify` commands."""

from __future__ import annotations

import copy
import json
import multiprocessing
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from fmtune.errors import FmtuneError
from fmtune.store.lineage import build_manifest, write_json_atomic
from fmtune.store.registry import (
    SCHEMA_VERSION,
    compare_runs,
    get_run,
    list_runs,
    record_run,
    registry_path,
    runs_app,
    verify_command,
)

EXAMPLE = json.loads((Path(__file__).parent / "fixtures" / "report_example.json").read_text())
WIDE = {"COLUMNS": "220"}  # keep rich tables from wrapping names in the captured output


@pytest.fixture(autouse=True)
def _no_manifest_key(monkeypatch):
    monkeypatch.delenv("FMTUNE_MANIFEST_KEY", raising=False)  # a developer's own key must not change what verify says


def _report(name: str, fine_tuned: float = 0.79, sha: str = "3f2a9c0d5e...") -> dict:
    report = copy.deepcopy(EXAMPLE)
    report["run"]["name"] = name
    report["data"]["sha256"] = sha
    for rung in report["ladder"]:
        if rung["name"] == "fine_tuned":
            rung["metrics"]["macro_f1"] = fine_tuned
            rung["ci95"]["macro_f1"] = [round(fine_tuned - 0.03, 2), round(fine_tuned + 0.03, 2)]
    report["verdict"]["gain"] = round(fine_tuned - 0.64, 2)
    return report


def test_registry_path_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("FMTUNE_REGISTRY", str(tmp_path / "env.sqlite"))
    assert registry_path(tmp_path / "flag.sqlite") == tmp_path / "flag.sqlite"
    assert registry_path() == tmp_path / "env.sqlite"
    monkeypatch.delenv("FMTUNE_REGISTRY")
    assert registry_path().name == "registry.sqlite" and registry_path().parent.name == "fmtune"


def test_record_list_get_round_trip(tmp_path):
    db = tmp_path / "nested" / "folder" / "registry.sqlite"  # parent folders are created
    record_run(tmp_path / "runs" / "quickstart", _report("quickstart"), "complete", db=db)

    [run] = list_runs(db)
    assert run["name"] == "quickstart"
    assert run["run_dir"] == str((tmp_path / "runs" / "quickstart").resolve())
    assert run["status"] == "complete"
    assert run["task_type"] == "classification"
    assert run["base_model"] == "minilm"
    assert run["primary_metric"] == "macro_f1"
    assert run["rung_metrics"] == {"zero_shot": 0.61, "few_shot": 0.64, "head_only": 0.74, "fine_tuned": 0.79, "from_scratch": 0.58}
    assert run["recommend"] is True
    assert run["gain"] == pytest.approx(0.15)
    assert run["data_sha256"] == "3f2a9c0d5e..."
    assert run["fmtune_version"] == "0.1.0"
    assert "report" not in run

    full = get_run("quickstart", db)
    assert full["report"] == _report("quickstart")

    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]


def test_name_falls_back_to_the_folder_and_status_updates_in_place(tmp_path):
    db = tmp_path / "r.sqlite"
    record_run(tmp_path / "runs" / "quickstart", None, "running", db=db)
    [running] = list_runs(db)
    assert (running["name"], running["status"], running["rung_metrics"], running["recommend"]) == ("quickstart", "running", {}, None)
    assert get_run("quickstart", db)["report"] is None

    record_run(tmp_path / "runs" / "quickstart", _report("quickstart"), "complete", db=db)
    [done] = list_runs(db)
    assert done["status"] == "complete"
    assert done["rung_metrics"]["fine_tuned"] == 0.79
    assert done["created_at"] == running["created_at"]
    assert done["updated_at"] >= running["updated_at"]


def test_invalid_status_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="finished"):
        record_run(tmp_path / "x", None, "finished", db=tmp_path / "r.sqlite")


def test_unknown_name_suggests_close_matches(tmp_path):
    db = tmp_path / "r.sqlite"
    with pytest.raises(FmtuneError, match="registry .* is empty"):
        get_run("quickstart", db)
    assert list_runs(db) == []
    assert not db.exists()  # reading does not create the registry

    record_run(tmp_path / "quickstart", _report("quickstart"), "complete", db=db)
    record_run(tmp_path / "support-tickets", _report("support-tickets"), "complete", db=db)
    with pytest.raises(FmtuneError, match="did you mean 'quickstart'"):
        get_run("quikstart", db)
    with pytest.raises(FmtuneError, match="known runs: quickstart, support-tickets"):
        get_run("zzz", db)


def test_a_file_that_is_not_a_registry_is_an_fmtune_error(tmp_path):
    db = tmp_path / "r.sqlite"
    db.write_text("not a database, just text " * 100)
    with pytest.raises(FmtuneError, match="cannot open the run registry"):
        list_runs(db)


def test_a_registry_from_a_newer_fmtune_is_refused(tmp_path):
    db = tmp_path / "r.sqlite"
    record_run(tmp_path / "a", None, "running", db=db)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(FmtuneError, match="newer fmtune"):
        record_run(tmp_path / "a", None, "complete", db=db)


def test_compare_runs_side_by_side(tmp_path):
    db = tmp_path / "r.sqlite"
    record_run(tmp_path / "a", _report("a", fine_tuned=0.79), "complete", db=db)
    record_run(tmp_path / "b", _report("b", fine_tuned=0.83), "complete", db=db)
    cmp = compare_runs("a", "b", db)
    assert (cmp["a"], cmp["b"], cmp["metric"]) == ("a", "b", "macro_f1")
    assert cmp["task"] == {"a": "classification", "b": "classification"}
    assert cmp["base_model"] == {"a": "minilm", "b": "minilm"}
    assert cmp["same_data"] is True
    assert cmp["notes"] == []
    assert [r["name"] for r in cmp["rungs"]] == ["zero_shot", "few_shot", "head_only", "fine_tuned", "from_scratch"]
    tuned = cmp["rungs"][3]
    assert (tuned["a"], tuned["b"]) == (0.79, 0.83)
    assert tuned["a_ci95"] == [0.76, 0.82] and tuned["b_ci95"] == [0.8, 0.86]
    assert tuned["delta"] == pytest.approx(0.04)
    assert cmp["rungs"][0]["delta"] == 0
    assert cmp["verdict"]["a"]["gain"] == pytest.approx(0.15) and cmp["verdict"]["b"]["gain"] == pytest.approx(0.19)

    record_run(tmp_path / "c", _report("c", sha="other"), "complete", db=db)
    assert compare_runs("a", "c", db)["same_data"] is False
    assert "different data" in compare_runs("a", "c", db)["notes"][0]


def _writer(db: str, worker: int, n: int) -> None:
    for i in range(n):
        record_run(Path(db).parent / f"w{worker}-{i}", _report(f"w{worker}-{i}"), "complete", db=Path(db))
        record_run(Path(db).parent / "shared", _report("shared", fine_tuned=0.5 + worker / 100), "complete", db=Path(db))


def test_concurrent_writers_do_not_corrupt_the_registry(tmp_path):
    db = tmp_path / "r.sqlite"
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold torch threads
    workers = [ctx.Process(target=_writer, args=(str(db), w, 25)) for w in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=120)
    assert [p.exitcode for p in workers] == [0, 0, 0, 0]

    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 4 * 25 + 1
    names = {r["name"] for r in list_runs(db)}
    assert names == {f"w{w}-{i}" for w in range(4) for i in range(25)} | {"shared"}
    assert get_run("shared", db)["rung_metrics"]["fine_tuned"] in {0.5, 0.51, 0.52, 0.53}


# ---------------------------------------------------------------- command line

@pytest.fixture
def two_runs(tmp_path) -> Path:
    db = tmp_path / "reg.sqlite"
    record_run(tmp_path / "baseline-run", _report("baseline-run", fine_tuned=0.79), "complete", db=db)
    record_run(tmp_path / "lora-run", _report("lora-run", fine_tuned=0.83), "complete", db=db)
    record_run(tmp_path / "half-done", None, "running", db=db)
    no_gain = _report("no-gain", fine_tuned=0.65)
    no_gain["verdict"]["recommend_fine_tuning"] = False
    record_run(tmp_path / "no-gain", no_gain, "interrupted", db=db)
    return db


def test_cli_list_with_registry_flag(two_runs):
    result = CliRunner().invoke(runs_app, ["list", "--registry", str(two_runs), "--format", "table"], env=WIDE)
    assert result.exit_code == 0, result.output
    for text in ("baseline-run", "lora-run", "half-done", "running", "complete", "classification", "minilm",
                 "fine_tuned", "0.790", "0.830", "0.610", "fine-tune (+0.150)", "fine-tune (+0.190)",
                 "no-gain", "interrupted", "don't (+0.010)"):
        assert text in result.output, text


def test_cli_list_with_env_var_and_empty_registry(tmp_path):
    result = CliRunner().invoke(runs_app, ["list"], env={**WIDE, "FMTUNE_REGISTRY": str(tmp_path / "none.sqlite")})
    assert result.exit_code == 0
    assert "no runs recorded" in result.output


def test_cli_show(two_runs, monkeypatch):
    monkeypatch.setenv("FMTUNE_REGISTRY", str(two_runs))
    result = CliRunner().invoke(runs_app, ["show", "lora-run"], env=WIDE)
    assert result.exit_code == 0, result.output
    for text in ("run lora-run", "complete", str(two_runs.parent / "lora-run"), "macro_f1", "0.830", "[0.800, 0.860]",
                 "accuracy 0.630", "fresh, rotten", "Fine-tuning helped", "train 2240"):
        assert text in result.output, text


def test_cli_show_unknown_name_raises_fmtune_error(two_runs):
    result = CliRunner().invoke(runs_app, ["show", "lora-rn", "--registry", str(two_runs)], env=WIDE)
    assert isinstance(result.exception, FmtuneError)
    assert "did you mean 'lora-run'" in str(result.exception)


def test_cli_compare(two_runs):
    result = CliRunner().invoke(runs_app, ["compare", "baseline-run", "lora-run", "--registry", str(two_runs)], env=WIDE)
    assert result.exit_code == 0, result.output
    for text in ("baseline-run vs lora-run", "same data", "fine_tuned", "0.790 [0.760, 0.820]", "0.830 [0.800, 0.860]",
                 "+0.040", "+0.000"):
        assert text in result.output, text


def _verify_app() -> typer.Typer:
    app = typer.Typer()
    app.command("verify")(verify_command)
    app.command("other")(lambda: None)  # two commands, so "verify" is a subcommand as under `fmtune`
    return app


def test_verify_command_reports_success_and_each_problem(tmp_path):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    (run / "report.json").write_text("{}")
    manifest = build_manifest(config={}, input_files={}, data_sha256="", base_model={}, seed=0, run_dir=run, hardware="cpu")
    write_json_atomic(run / "manifest.json", manifest)

    ok = CliRunner().invoke(_verify_app(), ["verify", str(run)], env=WIDE)
    assert ok.exit_code == 0, ok.output
    assert "verified: 2 files match the manifest" in ok.output

    (run / "model" / "config.json").write_text('{"changed": true}')
    (run / "model" / "[new].txt").write_text("x")
    bad = CliRunner().invoke(_verify_app(), ["verify", str(run)], env=WIDE)
    assert bad.exit_code == 1
    assert "model/config.json: sha256 differs from the manifest" in bad.output
    assert "model/[new].txt: not in the manifest" in bad.output
    assert "2 problem(s)" in bad.output


# ---------------------------------------------------------------- keyed by folder, not by name (trust review)

_V1_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE runs (
    name TEXT PRIMARY KEY, run_dir TEXT NOT NULL, status TEXT NOT NULL, task_type TEXT, base_model TEXT, primary_metric TEXT,
    rung_metrics TEXT NOT NULL DEFAULT '{}', recommend INTEGER, gain REAL, data_sha256 TEXT, created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL, fmtune_version TEXT, report TEXT
);
INSERT INTO schema_version (version) VALUES (1);
"""


def _v1_registry(db: Path, tmp_path: Path) -> None:
    """A registry as fmtune 0.1 wrote it: one row per run name (name TEXT PRIMARY KEY)."""
    with closing(sqlite3.connect(db)) as conn:
        conn.executescript(_V1_SCHEMA)
        for name, when in (("exp", "2026-01-02T10:00:00+00:00"), ("old-one", "2026-01-01T09:00:00+00:00")):
            conn.execute(
                "INSERT INTO runs (name, run_dir, status, primary_metric, rung_metrics, recommend, gain, created_at, updated_at, "
                "fmtune_version, report) VALUES (?, ?, 'complete', 'macro_f1', ?, 1, 0.15, ?, ?, '0.1.0', ?)",
                (name, str(tmp_path / "runs" / "a" / name), json.dumps({"fine_tuned": 0.79}), when, when, json.dumps(_report(name))),
            )
        conn.commit()


def test_two_runs_with_the_same_name_in_different_folders_are_both_kept(tmp_path):
    db = tmp_path / "r.sqlite"
    first, second = tmp_path / "runs" / "a" / "exp", tmp_path / "runs" / "b" / "exp"
    record_run(first, _report("exp", fine_tuned=0.79), "complete", db=db)
    record_run(second, _report("exp", fine_tuned=0.83), "complete", db=db)

    runs = list_runs(db)
    assert sorted(r["run_dir"] for r in runs) == [str(first.resolve()), str(second.resolve())]
    assert {r["name"] for r in runs} == {"exp"}
    assert len({r["id"] for r in runs}) == 2
    by_dir = {r["run_dir"]: r for r in runs}
    assert by_dir[str(first.resolve())]["rung_metrics"]["fine_tuned"] == 0.79
    assert by_dir[str(second.resolve())]["rung_metrics"]["fine_tuned"] == 0.83


def test_a_run_is_keyed_by_its_final_folder_through_every_status(tmp_path):
    db = tmp_path / "r.sqlite"
    final = tmp_path / "runs" / "exp"
    partial = tmp_path / "runs" / ".exp.partial"
    record_run(final, {"run": {"name": "exp", "status": "running"}}, "running", db=db, work_dir=partial)
    [running] = list_runs(db)
    assert (running["name"], running["run_dir"], running["status"]) == ("exp", str(final.resolve()), "running")
    assert running["work_dir"] == str(partial.resolve())
    record_run(final, {"run": {"name": "exp", "status": "interrupted"}}, "interrupted", db=db, work_dir=partial)
    record_run(final, {"run": {"name": "exp", "status": "running"}}, "running", db=db, work_dir=partial)  # --resume
    record_run(final, _report("exp"), "complete", db=db)
    [done] = list_runs(db)
    assert (done["id"], done["status"], done["work_dir"]) == (running["id"], "complete", None)
    assert done["created_at"] == running["created_at"]


@pytest.mark.parametrize("temporary", [".exp.partial", ".exp.tmp-4242"])
def test_a_temporary_folder_passed_as_the_run_folder_is_recorded_under_the_final_one(tmp_path, temporary):
    """An old call site passed the temporary folder; it must not make a row named '..partial' beside the real run."""
    db = tmp_path / "r.sqlite"
    record_run(tmp_path / "runs" / temporary, None, "running", db=db)
    record_run(tmp_path / "runs" / "exp", _report("exp"), "complete", db=db)
    [run] = list_runs(db)
    assert (run["name"], run["run_dir"], run["status"]) == ("exp", str((tmp_path / "runs" / "exp").resolve()), "complete")


def test_an_old_schema_registry_is_migrated_and_keeps_its_rows(tmp_path):
    db = tmp_path / "r.sqlite"
    _v1_registry(db, tmp_path)

    old = {r["name"]: r for r in list_runs(db)}
    assert set(old) == {"exp", "old-one"}
    assert old["exp"]["run_dir"] == str(tmp_path / "runs" / "a" / "exp")
    assert old["exp"]["created_at"] == "2026-01-02T10:00:00+00:00"
    assert old["exp"]["rung_metrics"] == {"fine_tuned": 0.79} and old["exp"]["recommend"] is True
    assert get_run("old-one", db)["report"] == _report("old-one")
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]

    record_run(tmp_path / "runs" / "b" / "exp", _report("exp", fine_tuned=0.9), "complete", db=db)  # same name, new folder
    assert sorted(r["run_dir"] for r in list_runs(db) if r["name"] == "exp") == [
        str(tmp_path / "runs" / "a" / "exp"), str((tmp_path / "runs" / "b" / "exp").resolve()),
    ]
    record_run(tmp_path / "runs" / "a" / "exp", _report("exp", fine_tuned=0.5), "complete", db=db)  # the migrated row updates
    assert len(list_runs(db)) == 3


def test_an_ambiguous_name_lists_the_candidates_and_how_to_pick_one(tmp_path, monkeypatch):
    db = tmp_path / "r.sqlite"
    first, second = tmp_path / "runs" / "a" / "exp", tmp_path / "runs" / "b" / "exp"
    record_run(first, _report("exp", fine_tuned=0.79), "complete", db=db)
    record_run(second, _report("exp", fine_tuned=0.83), "complete", db=db)
    ids = {r["run_dir"]: r["id"] for r in list_runs(db)}
    id_a, id_b = ids[str(first.resolve())], ids[str(second.resolve())]

    with pytest.raises(FmtuneError) as err:
        get_run("exp", db)
    message = str(err.value)
    assert "'exp' names 2 runs" in message
    assert str(first.resolve()) in message and str(second.resolve()) in message
    assert f"id {id_a}" in message and f"id {id_b}" in message
    assert "pass the run's id or its folder" in message

    assert get_run(str(second), db)["rung_metrics"]["fine_tuned"] == 0.83  # by path
    assert get_run(str(id_a), db)["rung_metrics"]["fine_tuned"] == 0.79  # by id
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path / "runs")
    assert get_run("b/exp", db)["run_dir"] == str(second.resolve())  # a relative path
    assert get_run("./a/exp", db)["run_dir"] == str(first.resolve())

    cmp = compare_runs(str(id_a), str(second), db)
    assert cmp["rungs"][3]["delta"] == pytest.approx(0.04)
    assert cmp["run_dir"] == {"a": str(first.resolve()), "b": str(second.resolve())}
    assert cmp["id"] == {"a": id_a, "b": id_b}

    shown = CliRunner().invoke(runs_app, ["show", "exp", "--registry", str(db)], env=WIDE)
    assert isinstance(shown.exception, FmtuneError) and "names 2 runs" in str(shown.exception)
    ok = CliRunner().invoke(runs_app, ["compare", str(id_a), f"#{id_b}", "--registry", str(db)], env=WIDE)
    assert ok.exit_code == 0, ok.output
    assert "+0.040" in ok.output and f"exp #{id_a}" in ok.output and f"exp #{id_b}" in ok.output
    assert str(first.resolve()) in ok.output.replace("\n", "")


# ---------------------------------------------------------------- `runs list` at 100 columns and piped

def _crowded_registry(tmp_path: Path) -> Path:
    db = tmp_path / "reg.sqlite"
    record_run(tmp_path / "baseline-run", _report("baseline-run", fine_tuned=0.79), "complete", db=db)
    long_name = "support-tickets-lora-r16-lr3e-4-seed7"
    record_run(tmp_path / long_name, _report(long_name, fine_tuned=0.8312), "complete", db=db)
    record_run(tmp_path / "half-done", None, "running", db=db)
    no_gain = _report("no-gain", fine_tuned=0.65)
    no_gain["verdict"]["recommend_fine_tuning"] = False
    record_run(tmp_path / "no-gain", no_gain, "interrupted", db=db)
    return db


def test_cli_list_fits_100_columns_without_truncating(tmp_path):
    db = _crowded_registry(tmp_path)
    result = CliRunner().invoke(runs_app, ["list", "--registry", str(db), "--format", "table"], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    assert "…" not in result.output and "..." not in result.output
    assert max(len(line) for line in result.output.splitlines()) <= 100
    for text in ("baseline-run", "half-done", "no-gain", "complete", "running", "interrupted",
                 "0.790", "0.831", "0.650", "0.610", "0.640", "0.740", "0.580", "+0.150", "+0.190", "+0.010"):
        assert text in result.output, f"{text!r} missing from\n{result.output}"
    assert "support-tickets-lora-r16-lr3e-4-seed7" in result.output.replace("\n", "").replace(" ", "") or \
        all(part in result.output for part in ("support-tickets", "seed7"))


def test_cli_list_piped_is_plain_tab_separated_text(tmp_path):
    db = _crowded_registry(tmp_path)
    result = CliRunner().invoke(runs_app, ["list", "--registry", str(db)], env={"COLUMNS": "100"})  # CliRunner: not a terminal
    assert result.exit_code == 0, result.output
    assert "…" not in result.output
    assert not set("│┃━─┏┡└╇") & set(result.output), result.output
    header, *rows = [line.split("\t") for line in result.output.splitlines()]
    assert header[:4] == ["id", "name", "status", "task"]
    assert {"zero_shot", "few_shot", "head_only", "fine_tuned", "from_scratch", "recommend", "gain", "run_dir"} <= set(header)
    assert all(len(row) == len(header) for row in rows)
    table = {row[header.index("name")]: dict(zip(header, row)) for row in rows}
    assert table["support-tickets-lora-r16-lr3e-4-seed7"]["fine_tuned"] == "0.8312"
    assert table["baseline-run"]["zero_shot"] == "0.61"
    assert table["no-gain"]["recommend"] == "no" and table["half-done"]["fine_tuned"] == ""
    assert table["baseline-run"]["run_dir"] == str((tmp_path / "baseline-run").resolve())

    as_json = CliRunner().invoke(runs_app, ["list", "--registry", str(db), "--format", "json"])
    assert as_json.exit_code == 0, as_json.output
    runs = {r["name"]: r for r in json.loads(as_json.output)}
    assert runs["support-tickets-lora-r16-lr3e-4-seed7"]["rung_metrics"]["fine_tuned"] == 0.8312


def test_verify_command_checks_the_html_report_and_the_signature(tmp_path):
    from fmtune.store.lineage import manifest_key

    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "logs").mkdir()
    (run / "model" / "config.json").write_text("{}")
    (run / "model" / "README.md").write_text("# model card\n")
    (run / "report.json").write_text("{}")
    (run / "report.html").write_text("<p>fine-tune: yes</p>")
    (run / "logs" / "run.log").write_text("done\n")
    key_file = tmp_path / "manifest.key"
    key_file.write_text("0123456789abcdef\n")
    manifest = build_manifest(config={}, input_files={}, data_sha256="", base_model={}, seed=0, run_dir=run, hardware="cpu",
                              key=manifest_key(key_file))
    write_json_atomic(run / "manifest.json", manifest)

    ok = CliRunner().invoke(_verify_app(), ["verify", str(run), "--key-file", str(key_file)], env=WIDE)
    assert ok.exit_code == 0, ok.output
    assert "verified: 5 files match the manifest" in ok.output and "signature: valid" in ok.output
    no_key = CliRunner().invoke(_verify_app(), ["verify", str(run)], env=WIDE)
    assert no_key.exit_code == 0 and "signature: not checked" in no_key.output and "--key-file" in no_key.output

    (run / "report.html").write_text("<p>fine-tune: no</p>")
    edited = CliRunner().invoke(_verify_app(), ["verify", str(run), "--key-file", str(key_file)], env=WIDE)
    assert edited.exit_code == 1
    assert "report.html: sha256 differs from the manifest" in edited.output and "1 problem(s)" in edited.output
