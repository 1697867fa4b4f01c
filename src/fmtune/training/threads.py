"""How torch's OpenMP threads wait between parallel regions, chosen before torch starts its thread pool.

A training step on a small model is hundreds of short parallel ops. When the worker threads sleep between them
(`OMP_WAIT_POLICY=PASSIVE`), every op pays a futex wake-up: measured on an idle 2-core Xeon, a MiniLM fine-tune took
27.8 s passive against 21.3 s when threads spin briefly first (`GOMP_SPINCOUNT=20000`, the same as libgomp's default
300000). But when another process keeps a core busy, spinning threads stall each other: the same job (1,000 texts)
took 17.5 s passive, 34.7 s with a 20000 spin and over 120 s with libgomp's default spin.

So fmtune looks before it starts: it samples /proc/stat for 0.15 s; when other processes keep half a core or more
busy, threads sleep (PASSIVE), otherwise they spin briefly (GOMP_SPINCOUNT=20000). The server always uses PASSIVE (its
event loop shares the cores). A user's own OMP_WAIT_POLICY / GOMP_SPINCOUNT always wins. The choice and its reason
are recorded in the report's levers.
"""

from __future__ import annotations

import os
import time

SPIN = "20000"
BUSY_CORES = 0.5  # other processes' load (in cores) from which threads sleep instead of spinning
_CHOICE_ENV = "FMTUNE_OMP_CHOICE"


def _cpu_times() -> tuple[int, int] | None:
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]), idle


def busy_cores(seconds: float = 0.15) -> float | None:
    """Cores kept busy by other processes while this one sleeps for `seconds` (None where /proc/stat is missing)."""
    a = _cpu_times()
    time.sleep(seconds)
    b = _cpu_times()
    if a is None or b is None or b[0] <= a[0]:
        return None
    total, idle = b[0] - a[0], b[1] - a[1]
    return (1 - idle / total) * (os.cpu_count() or 1)


def configure(serving: bool = False) -> dict:
    """Set the OpenMP wait policy for this process (before torch is imported) and return what was chosen and why."""
    if _CHOICE_ENV in os.environ:  # already decided in this process (or by a parent fmtune, e.g. --nproc)
        return choice()
    user = {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME") if k in os.environ}
    if user:
        policy, why = ", ".join(f"{k}={v}" for k, v in user.items()), "set by the user's environment"
    elif serving:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        policy, why = "OMP_WAIT_POLICY=PASSIVE", "serving: the HTTP event loop shares the cores with the model's threads"
    else:
        busy = busy_cores()
        if busy is not None and busy >= BUSY_CORES:
            os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
            policy, why = "OMP_WAIT_POLICY=PASSIVE", f"other processes kept {busy:.1f} cores busy: spinning threads would stall each other"
        else:
            os.environ["GOMP_SPINCOUNT"] = SPIN
            seen = "no /proc/stat to look at" if busy is None else f"other processes kept {busy:.1f} cores busy"
            policy, why = f"GOMP_SPINCOUNT={SPIN}", f"{seen}: threads spin briefly between ops instead of paying a wake-up each time"
    os.environ[_CHOICE_ENV] = f"{policy}|{why}"
    return choice()


def choice() -> dict:
    """The wait policy this process runs with, as recorded by `configure` (or the bare environment)."""
    recorded = os.environ.get(_CHOICE_ENV)
    if recorded:
        policy, _, why = recorded.partition("|")
        return {"policy": policy, "why": why}
    env = {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ}
    return {"policy": ", ".join(f"{k}={v}" for k, v in env.items()) or "OpenMP default", "why": "not chosen by fmtune (library use)"}
