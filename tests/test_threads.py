"""fmtune.training.threads: the OpenMP wait policy chosen from the machine's load, before torch starts its threads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fmtune.training import threads

VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "FMTUNE_OMP_CHOICE")


@pytest.fixture(autouse=True)
def clean_env():
    """configure() writes os.environ itself: save and restore these variables around every test."""
    saved = {k: os.environ.pop(k, None) for k in VARS}
    yield
    for k, v in saved.items():
        os.environ.pop(k, None)
        if v is not None:
            os.environ[k] = v


def test_idle_machine_spins_briefly(monkeypatch):
    monkeypatch.setattr(threads, "busy_cores", lambda seconds=0.15: 0.1)
    got = threads.configure()
    assert os.environ["GOMP_SPINCOUNT"] == threads.SPIN and "OMP_WAIT_POLICY" not in os.environ
    assert got["policy"] == f"GOMP_SPINCOUNT={threads.SPIN}" and "0.1 cores busy" in got["why"]
    assert threads.choice() == got


def test_busy_machine_sleeps(monkeypatch):
    monkeypatch.setattr(threads, "busy_cores", lambda seconds=0.15: 1.2)
    got = threads.configure()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and "GOMP_SPINCOUNT" not in os.environ
    assert got["policy"] == "OMP_WAIT_POLICY=PASSIVE" and "1.2 cores busy" in got["why"]


def test_the_users_setting_wins_and_serving_sleeps(monkeypatch):
    monkeypatch.setattr(threads, "busy_cores", lambda seconds=0.15: pytest.fail("no need to look when the user decided"))
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert threads.configure() == {"policy": "OMP_WAIT_POLICY=ACTIVE", "why": "set by the user's environment"}
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    for k in VARS:
        os.environ.pop(k, None)
    assert threads.configure(serving=True)["policy"] == "OMP_WAIT_POLICY=PASSIVE"


def test_decided_once_per_process_tree(monkeypatch):
    monkeypatch.setattr(threads, "busy_cores", lambda seconds=0.15: 0.0)
    first = threads.configure()
    monkeypatch.setattr(threads, "busy_cores", lambda seconds=0.15: 2.0)
    assert threads.configure() == first  # a child (e.g. under --nproc) inherits the parent's choice


def test_busy_cores_reads_proc_stat():
    busy = threads.busy_cores(0.05)
    assert busy is None or 0.0 <= busy <= (os.cpu_count() or 1)


def test_the_cli_sets_the_policy_before_torch_and_help_does_not_wait():
    code = "import sys; sys.argv = ['fmtune', 'predict', 'nowhere']; import fmtune.cli, os; print(os.environ.get('FMTUNE_OMP_CHOICE', ''))"
    env = {k: v for k, v in os.environ.items() if k not in VARS}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().split("|")[0] in (f"GOMP_SPINCOUNT={threads.SPIN}", "OMP_WAIT_POLICY=PASSIVE")
    code = "import sys; sys.argv = ['fmtune', 'run', '--help']; import fmtune.cli, os; print(os.environ.get('FMTUNE_OMP_CHOICE', 'unset'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == "unset"
