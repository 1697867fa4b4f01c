"""Load test of `fmtune serve`: the same server with and without micro-batching, under N concurrent clients.

    .venv/bin/python benchmarks/serve_load.py                      # a tiny random BERT run built here
    .venv/bin/python benchmarks/serve_load.py --run runs/quickstart --clients 16 --duration 15

Each mode starts the real entry point (`fmtune.serving.serve.serve`) in a subprocess on 127.0.0.1 and a free port, sends
single-text requests from `--clients` concurrent httpx clients for `--duration` seconds (after a short warm-up), and
records throughput, latency percentiles and errors. Writes benchmarks/results/serve_load.json and prints a table.
"""

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
WORDS = ["good", "bad", "great", "awful", "movie", "film", "plot", "fun", "boring", "the", "a", "was", "is", "not", "very"]
SERVER = """
import sys
from pathlib import Path
from fmtune.serving.serve import ServeConfig, load_api_keys, serve
run, port, micro, batch, wait, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
serve(Path(run), ServeConfig(port=port, api_keys=load_api_keys(None), micro_batching=micro, max_batch_size=batch, max_wait_ms=wait,
                             torch_threads=threads or None))
"""


def build_tiny_run(root: Path) -> Path:
    """The tests' tiny run folder: random 2-layer BERT classifier (safetensors), tokenizer, report.json."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    run = root / "tiny-run"
    (run / "model").mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"bcdefghijklmnopqrstuvwxyz"]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True, model_max_length=64)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    BertForSequenceClassification(config).save_pretrained(run / "model", safe_serialization=True)
    tokenizer.save_pretrained(run / "model")
    report = json.loads((ROOT / "tests" / "fixtures" / "report_example.json").read_text())
    report["run"]["name"] = "tiny-run"
    report["task"]["labels"] = ["neg", "pos"]
    report["base_model"]["max_length"] = 64
    (run / "report.json").write_text(json.dumps(report))
    (run / "manifest.json").write_text(json.dumps({"seed": 0}))
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 30))) for _ in range(n)]


def start_server(run: Path, micro: bool, args, key: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "FMTUNE_API_KEYS": key}
    cmd = [sys.executable, "-c", SERVER, str(run), str(port), "1" if micro else "0", str(args.max_batch_size), str(args.max_wait_ms), str(args.torch_threads or 0)]
    proc = subprocess.Popen(cmd, env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(proc)
    raise SystemExit(f"server did not answer /healthz within {args.startup_timeout} s:\n{log_path.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=20)


async def load(url: str, key: str, clients: int, seconds: float, texts_per_request: int, texts: list[str]) -> dict:
    """`clients` loops, each sending one request at a time until the deadline; raw latencies and status counts."""
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=30) as client:
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds

        async def one_client(i: int) -> None:
            rng = random.Random(i)
            while loop.time() < end:
                body = {"texts": rng.sample(texts, texts_per_request)}
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/predict", json=body)
                    code = str(r.status_code)
                except httpx.HTTPError as exc:
                    code = type(exc).__name__
                statuses[code] = statuses.get(code, 0) + 1
                if code == "200":
                    latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(one_client(i) for i in range(clients)))
        return {"seconds": time.perf_counter() - started, "latencies": latencies, "statuses": statuses}


def summarise(segments: list[dict], texts_per_request: int) -> dict:
    seconds = sum(s["seconds"] for s in segments)
    lat = sorted(x for s in segments for x in s["latencies"])
    statuses: dict[str, int] = {}
    for s in segments:
        for code, n in s["statuses"].items():
            statuses[code] = statuses.get(code, 0) + n
    ok = statuses.get("200", 0)
    pct = lambda q: round(1000 * lat[min(len(lat) - 1, int(q * len(lat)))], 2) if lat else None  # noqa: E731
    return {
        "seconds": round(seconds, 2),
        "requests_ok": ok,
        "errors": sum(n for code, n in statuses.items() if code != "200"),
        "statuses": statuses,
        "requests_per_s": round(ok / seconds, 1),
        "texts_per_s": round(ok * texts_per_request / seconds, 1),
        "latency_p50_ms": pct(0.50),
        "latency_p99_ms": pct(0.99),
        "latency_mean_ms": round(1000 * sum(lat) / len(lat), 2) if lat else None,
        "rounds_requests_per_s": [round(s["statuses"].get("200", 0) / s["seconds"], 1) for s in segments],
    }


def machine() -> dict:
    import torch

    from fmtune.models.loading import hardware_description

    return {"hardware": hardware_description(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "load_average_at_start": list(os.getloadavg())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, help="a finished run folder (default: build a tiny random BERT run)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients")
    p.add_argument("--duration", type=float, default=15.0, help="seconds of load per mode (split over the rounds)")
    p.add_argument("--rounds", type=int, default=3, help="alternate the modes this many times, so background load hits both alike")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring, per mode")
    p.add_argument("--texts-per-request", type=int, default=1)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--torch-threads", type=int, default=0, help="server model threads (0: torch's default)")
    p.add_argument("--startup-timeout", type=float, default=120.0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_load.json")
    args = p.parse_args()

    key = secrets.token_urlsafe(32)
    texts = sample_texts(500)
    modes = {"micro_batching": True, "one_request_at_a_time": False}
    segments: dict[str, list[dict]] = {name: [] for name in modes}
    desc = machine()
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or build_tiny_run(Path(tmp))
        servers = {}
        try:
            for name, micro in modes.items():  # both up at once; an idle server costs no CPU
                servers[name] = start_server(run, micro, args, key, Path(tmp) / f"server-{name}.log")
            for name, (_, url) in servers.items():
                asyncio.run(load(url, key, args.clients, args.warmup, args.texts_per_request, texts))
            for r in range(args.rounds):
                for name in (list(modes) if r % 2 == 0 else list(modes)[::-1]):
                    url = servers[name][1]
                    segments[name].append(asyncio.run(load(url, key, args.clients, args.duration / args.rounds, args.texts_per_request, texts)))
                    print(f"round {r + 1} {name}: {segments[name][-1]['statuses']}", file=sys.stderr)
        finally:
            for proc, _ in servers.values():
                stop_server(proc)
        logs = {name: (Path(tmp) / f"server-{name}.log").read_text(errors="replace") for name in modes}
    if any(key in text for text in logs.values()):
        raise SystemExit("the API key appeared in a server log: that is a security bug in fmtune serve")
    print(next((line for line in logs["micro_batching"].splitlines() if "serving run" in line), "(no start line in the server log)"), file=sys.stderr)
    desc["load_average_at_end"] = list(os.getloadavg())
    results = {name: summarise(segs, args.texts_per_request) for name, segs in segments.items()}

    micro, serial = results["micro_batching"], results["one_request_at_a_time"]
    out = {
        "benchmark": "fmtune serve under concurrent load, micro-batching vs one request at a time",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": desc,
        "parameters": {"run": str(args.run) if args.run else "tiny random BERT (2 layers, hidden 32), built by the script",
                       "clients": args.clients, "duration_s": args.duration, "rounds": args.rounds, "warmup_s": args.warmup,
                       "torch_threads": args.torch_threads or "torch default",
                       "texts_per_request": args.texts_per_request, "max_batch_size": args.max_batch_size,
                       "max_wait_ms": args.max_wait_ms, "transport": "HTTP/1.1 keep-alive on 127.0.0.1, server in a subprocess"},
        "results": results,
        "key_in_server_logs": False,
        "gain": {
            "throughput_ratio": round(micro["requests_per_s"] / serial["requests_per_s"], 2) if serial["requests_per_s"] else None,
            "p50_latency_ratio": round(serial["latency_p50_ms"] / micro["latency_p50_ms"], 2) if micro["latency_p50_ms"] else None,
            "note": "ratios > 1 mean micro-batching is better (more requests/s, lower median latency)",
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")

    print(f"\n{'mode':<24}{'req/s':>9}{'texts/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for name, r in results.items():
        print(f"{name:<24}{r['requests_per_s']:>9}{r['texts_per_s']:>9}{r['latency_p50_ms']:>9}{r['latency_p99_ms']:>9}{r['errors']:>8}")
    print(f"gain: {out['gain']['throughput_ratio']}x throughput, {out['gain']['p50_latency_ratio']}x lower p50 latency -> {args.out}")


if __name__ == "__main__":
    main()
