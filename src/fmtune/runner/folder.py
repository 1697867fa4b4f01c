"""The run folder's lifecycle, the same for every task kind: its name, the stable partial folder an unfinished run lives
in (resume), the overwrite rules (fmtune never deletes what it did not create), the registry row through its statuses,
the interrupted marker, and the bytes a run wrote."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from datetime import datetime
from pathlib import Path

from fmtune.config import RunConfig
from fmtune.console import console, disk_io
from fmtune.errors import ConfigError


def run_name(cfg: RunConfig) -> str:
    if cfg.name:
        return cfg.name
    src = cfg.data.data or cfg.data.train
    stem = Path(str(src)).name.split(".")[0] if src else "run"
    return f"{stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def comparable(cfg: RunConfig) -> dict:
    """The config without the keys that only say where and how to (re)start."""
    d = cfg.model_dump(mode="json")
    for key in ("name", "out", "overwrite", "resume"):
        d.pop(key, None)
    return d


def partial_dir(out: Path) -> Path:
    """Where an unfinished run lives until it is complete (a stable name, so that a re-run finds it)."""
    return out.parent / f".{out.name}.partial"


def saved_config(folder: Path) -> RunConfig | None:
    """The configuration an unfinished run folder was started with (its config.yaml), or None when it holds none."""
    import yaml

    try:
        return RunConfig.model_validate(yaml.safe_load((folder / "config.yaml").read_text()))
    except Exception:
        return None


def find_resumable(cfg: RunConfig) -> Path | None:
    root = Path(cfg.out).parent if cfg.out else Path("runs")
    candidates = sorted(root.glob(".*.partial"), key=lambda p: p.stat().st_mtime, reverse=True)
    for folder in candidates:
        saved = saved_config(folder)
        if saved is not None and comparable(saved) == comparable(cfg):
            return folder.parent / folder.name[1 : -len(".partial")]
    return None


def open_run_dir(cfg: RunConfig, name: str) -> tuple[Path, Path, bool]:
    """(final folder, partial folder, resuming?) after checking what is already on disk."""
    out = Path(cfg.out) if cfg.out else Path("runs") / name
    if cfg.resume and not (cfg.name or cfg.out):
        found = find_resumable(cfg)
        if found is None:
            raise ConfigError("--resume: no unfinished run with this configuration under runs/. Pass --name/--out of the run to resume, or drop --resume.")
        out = found
    check_run_target(out)
    partial = partial_dir(out)
    if out.exists() or out.is_symlink():
        if not cfg.overwrite:
            raise ConfigError(f"{out} already exists. Fix: pass --overwrite to replace it (only an fmtune run folder or an empty folder is replaced), or --name/--out for a new run folder.")
        check_replaceable(out)
    resuming = False
    if partial.exists() or partial.is_symlink():
        saved = saved_config(partial)
        ours = saved is not None
        same = ours and comparable(saved) == comparable(cfg)
        if same and not cfg.overwrite:
            resuming = True
        elif cfg.overwrite:
            if not ours and not is_empty_dir(partial):
                raise ConfigError(f"{partial} is in the place of this run's unfinished folder but holds no fmtune run configuration (config.yaml); fmtune deletes only what it created. "
                                  "Fix: move it away, or pass --name/--out for a new run.")
            shutil.rmtree(partial)
        else:
            raise ConfigError(f"{partial} holds an unfinished run with a different configuration. Fix: pass --overwrite to discard it, or --name/--out for a new run.")
    elif cfg.resume:
        raise ConfigError(f"--resume: there is no unfinished run at {partial}.")
    return out, partial, resuming


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and next(path.iterdir(), None) is None


def is_fmtune_run(path: Path) -> bool:
    """Whether `path` holds a finished fmtune run: a manifest.json that fmtune wrote (manifest and fmtune versions)."""
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "manifest_version" in manifest and "fmtune_version" in manifest


def check_run_target(out: Path) -> None:
    """Refuse run folders whose replacement would destroy a user's files: the filesystem root, the home folder, the
    current folder or any folder above it (a run is written beside its folder and renamed into place)."""
    where = Path(out).expanduser().resolve()
    cwd = Path.cwd().resolve()
    home = Path.home().resolve()
    reasons = []
    if where == Path(where.anchor):
        reasons.append("it is the filesystem root")
    if where == home:
        reasons.append("it is your home folder")
    if where == cwd or where in cwd.parents:
        reasons.append("it is the current folder" if where == cwd else "it holds the current folder")
    if reasons:
        raise ConfigError(f"--out {out}: cannot be a run folder: {' and '.join(reasons)} ({where}). A run folder is replaced as a whole, "
                          "so fmtune refuses it. Fix: name a new folder, e.g. --out runs/my-run.")


def check_replaceable(out: Path) -> None:
    """--overwrite replaces only what fmtune created: a finished run folder (its manifest.json) or an empty folder."""
    if out.is_symlink() or not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is {'a symbolic link' if out.is_symlink() else 'not a folder'}; fmtune replaces only a run folder it wrote. "
                          "Fix: pass --name/--out for a new run folder.")
    if is_fmtune_run(out) or is_empty_dir(out):
        return
    entries = sorted(p.name for p in out.iterdir())
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    raise ConfigError(f"--out {out}: --overwrite replaces only an fmtune run folder (one with fmtune's manifest.json) or an empty folder, "
                      f"and {out} holds other files ({shown}). Nothing was deleted. Fix: pass --name/--out for a new run folder, "
                      "or move those files away yourself.")


def disk_line(io_start: dict[str, int] | None, tmp: Path) -> str:
    """One line for logs/run.log: what the run wrote to disk, next to the size of what it keeps."""
    folder = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file() and not p.is_symlink())
    now = disk_io()
    if now is None or io_start is None:
        return f"disk: run folder {folder / 1e6:.1f} MB (bytes written not measured on this platform)"
    written = {k: now[k] - io_start.get(k, 0) for k in now}
    return (f"disk: {written['write_bytes'] / 1e6:.1f} MB written to storage by this run (/proc/self/io write_bytes; "
            f"{written['wchar'] / 1e6:.1f} MB passed to write(), {written.get('cancelled_write_bytes', 0) / 1e6:.1f} MB cancelled before reaching disk); "
            f"run folder {folder / 1e6:.1f} MB")


def replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished run into place; a folder already there is replaced only when fmtune wrote it (checked again
    here: it may have changed since the run started). The old run is renamed aside first, so a failure never leaves
    neither run in place."""
    check_run_target(out)
    if not (out.exists() or out.is_symlink()):
        os.replace(tmp, out)
        return
    check_replaceable(out)
    aside = out.parent / f".{out.name}.replaced-{os.getpid()}"
    os.replace(out, aside)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(aside, out)
        raise
    shutil.rmtree(aside)


def record(run_dir: Path, name: str, status: str, work_dir: Path | None = None) -> None:
    """The registry row of the run whose final folder is `run_dir`; `work_dir` is where its unfinished files are."""
    from fmtune.store import registry

    try:
        registry.record_run(run_dir, {"run": {"name": name, "status": status}}, status, work_dir=work_dir)
    except Exception as exc:  # the registry is a convenience; it must never lose a run
        console.print(f"[yellow]warning:[/] could not record the run in the registry ({exc}).")


def mark_interrupted(tmp: Path, out: Path, resumable: bool = True) -> None:
    """Leave the partial folder visibly unfinished, never in the final place, and say how to continue (a task kind that
    keeps no checkpoints, Supports.resume False, starts again when re-run)."""
    if tmp.exists():
        how = "Re-run the same command (or add --resume) to continue." if resumable else "Re-run the same command to start it again (this task kind keeps no checkpoints)."
        (tmp / "STATUS").write_text(f"status: interrupted\nThis run did not finish; its outputs are incomplete. {how}\n")
        console.print(f"[yellow]The run did not finish (status: interrupted); partial outputs are in {tmp}. "
                      + ("Re-run the same command with --resume to continue from the last checkpoint.[/]" if resumable else f"{how}[/]"))


@contextlib.contextmanager
def marked_on_failure(out: Path, tmp: Path, name: str, resumable: bool = True, main: bool = True):
    """Around a run's work: on any exception (Ctrl-C included) the partial folder is marked interrupted and the registry
    row says interrupted or failed (rank 0 only); the exception goes on."""
    try:
        yield
    except BaseException as exc:
        if main:
            mark_interrupted(tmp, out, resumable)
            record(out, name, "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed", work_dir=tmp)
        raise
