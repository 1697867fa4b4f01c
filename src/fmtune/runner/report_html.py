"""Human-readable report: report.json -> one self-contained report.html and the model card (model/README.md).

Everything is built from the report dict alone. Keys may be missing or replaced by {"skipped": "reason"};
each section then says "skipped: <reason>" instead of failing. Charts are matplotlib PNGs inlined as
data: URIs, so the page needs no network to view or print.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jinja2

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parents[1] / "templates"
NO_TRAINING_RUNGS = ("zero_shot", "few_shot")
RUNG_COLORS = {
    "zero_shot": "#9aa5b1",
    "few_shot": "#7b8794",
    "head_only": "#5a9bd5",
    "fine_tuned": "#2b8a3e",
    "lora": "#2b8a3e",
    "full": "#2b8a3e",
    "from_scratch": "#c2410c",
}
# parse_math off: a class named "$5 off" is plain text, not TeX
CHART_STYLE = {"font.size": 9, "axes.spines.top": False, "axes.spines.right": False, "text.parse_math": False}
FORECAST_MODELS: dict[str, Callable[[float, float, float], float]] = {
    "1 - metric = a * n^(-b)": lambda n, a, b: 1.0 - a * n ** (-b),
    "metric = a * n^(-b)": lambda n, a, b: a * n ** (-b),
}


# ---------------------------------------------------------------- public API


def render_html(report: dict) -> str:
    """One self-contained HTML page (inline CSS, charts as data: URIs) for a report.json dict."""
    env = _environment(autoescape=True)
    view = _view(report)
    return env.get_template("report.html.j2").render(r=report, v=view, charts=_charts(report, view))


def write_html(report: dict, path: Path) -> None:
    """Render the report and write it atomically (a .tmp file next to it, then os.replace)."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(render_html(report), encoding="utf-8")
    os.replace(tmp, path)


def render_model_card(report: dict) -> str:
    """Markdown for model/README.md: a Hugging Face model card with YAML front matter."""
    env = _environment(autoescape=False)
    view = _view(report)
    front = _front_matter(report, view).strip()
    return env.get_template("model_card.md.j2").render(r=report, v=view, front_matter=front)


# ---------------------------------------------------------------- template environment and filters


def _environment(autoescape: bool) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=autoescape,
        undefined=jinja2.ChainableUndefined,  # a missing key renders as "—", never raises
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(num=_num, metric=_metric, signed=_signed, pct=_pct, ci=_ci, md=_md, label=_label, pairs=_pairs, columns=_columns)
    env.tests["given"] = _given
    return env


def _given(x: Any) -> bool:
    """True for a value that is present (not missing, not None)."""
    return x is not None and not isinstance(x, jinja2.Undefined)


def _num(x: Any, digits: int = 3) -> str:
    """Short human number: ints with thousands separators, floats to `digits` significant figures."""
    if not _given(x):
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        if abs(x) >= 100:
            return f"{x:.4g}"
        return f"{x:.{digits}g}"
    return str(x)


def _metric(x: Any) -> str:
    """A score with three decimals, so a column of scores lines up: 0.79 -> '0.790'."""
    if not isinstance(x, int | float) or isinstance(x, bool) or not math.isfinite(x) or abs(x) >= 1000:
        return _num(x)
    return f"{x:.3f}"


def _signed(x: Any) -> str:
    """A difference of scores with its sign: 0.15 -> '+0.150'."""
    if not isinstance(x, int | float) or isinstance(x, bool) or not math.isfinite(x):
        return _num(x)
    return f"{x:+.3f}"


def _pct(x: Any) -> str:
    if not isinstance(x, int | float) or isinstance(x, bool):
        return _num(x)
    return f"{x * 100:+.1f}%"


def _ci(pair: Any) -> str:
    if isinstance(pair, list | tuple) and len(pair) == 2:
        return f"{_metric(pair[0])} – {_metric(pair[1])}"
    return "—"


def _md(x: Any) -> str:
    """A value safe inside a Markdown table cell: one line, no pipes, no raw HTML."""
    text = _num(x) if not isinstance(x, str) else x
    text = " ".join(text.split())
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _pairs(x: Any) -> list[tuple[Any, Any]]:
    """dict.items() that is empty for anything that is not a dict (missing keys included)."""
    return list(x.items()) if isinstance(x, dict) else []


def _columns(rows: Any) -> list[str]:
    """Union of the keys of a list of dicts, in first-seen order."""
    seen: dict[str, None] = {}
    for row in rows if isinstance(rows, list) else []:
        if isinstance(row, dict):
            seen.update(dict.fromkeys(row))
    return list(seen)


def _label(name: Any) -> str:
    """snake_case key -> words: 'train_test_overlap' -> 'train test overlap'."""
    return str(name).replace("_", " ")


# ---------------------------------------------------------------- derived values shared by both templates


def _skip_reason(section: Any, missing: str = "not in this report") -> str | None:
    """None when a section holds data; otherwise why it does not."""
    if section is None:
        return missing
    if isinstance(section, dict):
        if section.get("skipped"):
            return str(section["skipped"])
        if not section:
            return missing
    return None


def _view(report: dict) -> dict[str, Any]:
    """Values the templates need that take more than a lookup: skip reasons, metric columns, rows."""
    task = report.get("task") or {}
    primary = task.get("primary_metric") or "score"
    ladder = [r for r in report.get("ladder") or [] if isinstance(r, dict)]
    extra_metrics: list[str] = []
    for rung in ladder:
        for name in rung.get("metrics") or {}:
            if name != primary and name not in extra_metrics:
                extra_metrics.append(name)
    data = report.get("data") or {}
    audit = data.get("audit") or {}
    lc = report.get("learning_curve")
    labels = list(task.get("labels") or [])
    is_generation = task.get("type") == "generation"

    return {
        "primary": primary,
        "extra_metrics": extra_metrics,
        "ladder": ladder,
        "is_generation": is_generation,
        "is_label_scoring": task.get("model_kind") == "causal_lm" and not is_generation,
        "skipped_rungs": _skipped_rungs(report.get("skipped_rungs")),
        "labels": labels,
        "skip": {
            "verdict": _skip_reason(report.get("verdict")),
            "ladder": None if ladder else "no ladder rungs in this report",
            "training": None if _history_rungs(ladder) else "no per-epoch training history recorded",
            "learning_curve": _skip_reason(lc) or (None if (lc or {}).get("points") else "no learning-curve points"),
            "confusion": _confusion_skip(ladder, is_generation),
            "retention": _skip_reason(report.get("retention")),
            "domain_shift": _skip_reason(report.get("domain_shift")),
            "cost": _skip_reason(report.get("cost")),
            "inference": _skip_reason(report.get("inference")),
            "data": _skip_reason(data),
            "choices": None if report.get("choices") else "no automatic choices recorded",
        },
        "history_rungs": _history_rungs(ladder),
        "per_class_rows": _per_class_rows(ladder, labels),
        "class_count_labels": _class_count_labels(audit.get("class_counts") or {}, labels),
        "dropped": data.get("dropped") or audit.get("dropped") or {},
        "pii_found": _count(audit.get("pii")),
        "pii_redacted": _count(audit.get("pii_redacted")),
        "latency_rows": _latency_rows(report.get("inference") or {}),
        "finetuned": next((r for r in ladder if r.get("name") == "fine_tuned"), None),
    }


def _count(counts: Any) -> int:
    """Sum of the integer values of a {kind: count} dict; 0 for anything else."""
    if not isinstance(counts, dict):
        return 0
    return sum(n for n in counts.values() if isinstance(n, int) and not isinstance(n, bool))


def _history_rungs(ladder: list[dict]) -> list[dict]:
    return [r for r in ladder if r.get("history")]


def _skipped_rungs(value) -> list[tuple[str, str]]:
    """[(rung, reason)] from report["skipped_rungs"] ({rung: reason} or [{"name", "reason"}])."""
    if isinstance(value, dict):
        return [(str(k), str(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [(str(x.get("name", "")), str(x.get("reason", ""))) for x in value if isinstance(x, dict)]
    return []


def _confusion_skip(ladder: list[dict], is_generation: bool) -> str | None:
    if any(r.get("confusion_matrix") or r.get("per_class_f1") for r in ladder):
        return None
    if is_generation:
        return "not applicable to generation tasks"
    return "no confusion matrices or per-class scores recorded"


def _per_class_rows(ladder: list[dict], labels: list[str]) -> list[dict[str, Any]]:
    """One row per class: {'label': 'fresh', 'scores': [f1 per rung, in ladder order]}."""
    names = list(labels)
    for rung in ladder:
        names += [n for n in rung.get("per_class_f1") or {} if n not in names]
    return [
        {"label": name, "scores": [(r.get("per_class_f1") or {}).get(name) for r in ladder]}
        for name in names
        if any(name in (r.get("per_class_f1") or {}) for r in ladder)
    ]


def _class_count_labels(class_counts: dict, labels: list[str]) -> list[str]:
    names = list(labels)
    for counts in class_counts.values():
        if isinstance(counts, dict):
            names += [n for n in counts if n not in names]
    return names


def _latency_rows(inference: dict) -> list[dict[str, Any]]:
    """Rows of the size & latency table: (measure, base, fine_tuned) for every number both sides may have."""
    base, tuned = inference.get("base") or {}, inference.get("fine_tuned") or {}
    rows = []
    for key in ("parameters", "size_mb", "latency_ms"):
        if key in base or key in tuned:
            rows.append({"name": key, "base": base.get(key), "tuned": tuned.get(key)})
    base_lat, tuned_lat = base.get("latency") or {}, tuned.get("latency") or {}
    for key in dict.fromkeys([*base_lat, *tuned_lat]):
        if key != "batch_size":
            rows.append({"name": key, "base": base_lat.get(key), "tuned": tuned_lat.get(key)})
    for row in rows:
        b, t = row["base"], row["tuned"]
        row["change"] = (t - b) / b if isinstance(b, int | float) and isinstance(t, int | float) and b else None
    return rows


# fmtune's metric names -> the Hub's metric ids (and their config) in a model card's model-index
HUB_METRICS = {"macro_f1": ("f1", "macro"), "accuracy": ("accuracy", None), "rouge_l": ("rouge", "rougeL"), "exact_match": ("exact_match", None),
               "token_f1": ("f1", "token"), "loss": ("loss", None)}


def _front_matter(report: dict, view: dict) -> str:
    """The card's YAML metadata, built with huggingface_hub's card classes: the base model's Hub id and license where
    known, a model-index with the fine-tuned model's test metrics and their 95% CIs, the data's hash and the verdict."""
    from huggingface_hub import EvalResult, ModelCardData

    from fmtune.models.loading import hub_identity

    base, data, verdict_ = report.get("base_model") or {}, report.get("data") or {}, report.get("verdict") or {}
    hub_id, license_ = hub_identity(base.get("name"), base.get("path"))
    task = "text-generation" if view["is_generation"] else "text-classification"
    metrics = [view["primary"], *[m for m in view["extra_metrics"] if m != view["primary"]]]
    ft = view["finetuned"] or {}
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", str((report.get("run") or {}).get("name") or "")).strip("-.") or "fmtune-model"  # a Hub-style name
    results = []
    for metric in metrics:
        value, ci = (ft.get("metrics") or {}).get(metric), (ft.get("ci95") or {}).get(metric)
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            continue
        hub_metric, config = HUB_METRICS.get(metric, (metric, None))
        results.append(EvalResult(task_type=task, dataset_type="fmtune-local", dataset_name=f"{name} test split", dataset_split="test",
                                  dataset_revision=data.get("sha256"), metric_type=hub_metric, metric_config=config, metric_value=round(float(value), 4),
                                  metric_name=f"{metric} (test)", metric_args={"ci95": [round(float(c), 4) for c in ci]} if isinstance(ci, list) and len(ci) == 2 else None))
    fmtune_block = {k: v for k, v in {"version": report.get("fmtune_version"), "data_sha256": data.get("sha256"), "base_model": base.get("name"),
                                       "recommend_fine_tuning": verdict_.get("recommend_fine_tuning"), "verdict": _md(verdict_["headline"]) if verdict_.get("headline") else None}.items() if v is not None}
    card = ModelCardData(base_model=hub_id, library_name="transformers", license=license_ or "unknown", pipeline_tag=task, tags=["fmtune", task],
                         metrics=metrics, model_name=name if results else None, eval_results=results or None, fmtune=fmtune_block or None)
    return card.to_yaml()


# ---------------------------------------------------------------- charts (matplotlib, Agg, inline PNG)


def _charts(report: dict, view: dict[str, Any]) -> dict[str, Any]:
    """Every chart as a data: URI (or None when there is nothing to draw)."""
    ladder, primary = view["ladder"], view["primary"]
    lc = report.get("learning_curve") or {}
    charts: dict[str, Any] = {
        "ladder": _safe(_ladder_chart, ladder, primary) if not view["skip"]["ladder"] else None,
        "training": _safe(_training_chart, view["history_rungs"]) if view["history_rungs"] else None,
        "learning_curve": _safe(_learning_curve_chart, lc, primary) if not view["skip"]["learning_curve"] else None,
        "confusion": {},
    }
    for rung in ladder:
        if rung.get("confusion_matrix"):
            charts["confusion"][rung.get("name")] = _safe(_confusion_chart, rung, view["labels"])
    return charts


def _safe(draw: Callable[..., str], *args: Any) -> str | None:
    """A chart must not cost the whole report: log and leave it out if the data cannot be drawn."""
    try:
        with _pyplot().rc_context(CHART_STYLE):
            return draw(*args)
    except Exception as exc:  # noqa: BLE001 - the page is still useful without this one picture
        log.warning("report.html: could not draw %s: %s", draw.__name__, exc)
        return None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _ladder_chart(ladder: list[dict], primary: str) -> str:
    plt = _pyplot()
    names, values, low, high, colors = [], [], [], [], []
    for rung in ladder:
        value = (rung.get("metrics") or {}).get(primary)
        if not _is_number(value):
            continue
        ci = (rung.get("ci95") or {}).get(primary)
        ok = isinstance(ci, list | tuple) and len(ci) == 2 and all(_is_number(c) for c in ci)
        names.append(str(rung.get("name")))
        values.append(value)
        low.append(max(value - ci[0], 0) if ok else 0)
        high.append(max(ci[1] - value, 0) if ok else 0)
        colors.append(RUNG_COLORS.get(str(rung.get("name")), "#5a9bd5"))
    fig, ax = plt.subplots(figsize=(6, 3))
    xs = range(len(names))
    ax.bar(xs, values, color=colors, yerr=[low, high], capsize=5, ecolor="#333333")
    for x, v, h in zip(xs, values, high):
        ax.text(x, v + h, _metric(v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), names)
    ax.set_ylabel(f"{primary} (test)")
    top = max((v + h for v, h in zip(values, high)), default=1.0)
    ax.set_ylim(0, top * 1.15 if top > 0 else 1.0)
    ax.set_title(f"{primary} per rung, 95% CI", fontsize=9)
    return _png(fig)


def _training_chart(rungs: list[dict]) -> str:
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(1, len(rungs), figsize=(3.2 * len(rungs), 2.8), sharey=True, squeeze=False)
    for ax, rung in zip(axes[0], rungs):
        history = [h for h in rung["history"] if isinstance(h, dict)]
        for key, style in (("train_loss", "-o"), ("val_loss", "--s")):
            points = [(h.get("epoch"), h.get(key)) for h in history if _is_number(h.get(key))]
            if points:
                ax.plot(*zip(*points), style, markersize=4, label=key.replace("_", " "))
        best = rung.get("best_epoch")
        if _is_number(best):
            ax.axvline(best, color="#2b8a3e", linestyle=":", linewidth=1.5, label=f"best epoch {best}")
        ax.set_title(str(rung.get("name")), fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7, frameon=False)
    axes[0][0].set_ylabel("loss")
    return _png(fig)


def _learning_curve_chart(lc: dict, primary: str) -> str:
    plt = _pyplot()
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter
    points = [p for p in lc.get("points") or [] if _is_number(p.get("train_examples")) and _is_number(p.get("metric"))]
    fig, ax = plt.subplots(figsize=(6, 3))
    xs = [p["train_examples"] for p in points]
    ys = [p["metric"] for p in points]
    err = [[], []]
    for p in points:
        ci = p.get("ci95")
        ok = isinstance(ci, list | tuple) and len(ci) == 2 and all(_is_number(c) for c in ci)
        err[0].append(max(p["metric"] - ci[0], 0) if ok else 0)
        err[1].append(max(ci[1] - p["metric"], 0) if ok else 0)
    ax.errorbar(xs, ys, yerr=err, fmt="o", color="#2b8a3e", capsize=4, label="measured (95% CI)")

    forecast = lc.get("forecast") or {}
    at_2x = forecast.get("at_2x") or {}
    target = forecast.get("target") or {}
    x_max = max([*xs, at_2x.get("train_examples") or 0], default=1)
    curve = FORECAST_MODELS.get(str(forecast.get("model", "")).strip())
    params = forecast.get("params") or {}
    if curve and xs and _is_number(params.get("a")) and _is_number(params.get("b")):
        grid = [min(xs) + (x_max - min(xs)) * i / 60 for i in range(61)]
        ax.plot(grid, [curve(n, params["a"], params["b"]) for n in grid], color="#7b8794", label=f"forecast: {forecast['model']}")
    if _is_number(at_2x.get("train_examples")) and _is_number(at_2x.get("metric")):
        ci = at_2x.get("interval")
        ok = isinstance(ci, list | tuple) and len(ci) == 2 and all(_is_number(c) for c in ci)
        yerr = [[max(at_2x["metric"] - ci[0], 0)], [max(ci[1] - at_2x["metric"], 0)]] if ok else None
        ax.errorbar([at_2x["train_examples"]], [at_2x["metric"]], yerr=yerr, fmt="D", color="#c2410c", capsize=4,
                    mfc="white", label="forecast at 2x data")
    if _is_number(target.get("metric")):
        needs = f", needs ~{_num(target['train_examples'])} examples" if _is_number(target.get("train_examples")) else ""
        ax.axhline(target["metric"], color="#c2410c", linestyle=":", linewidth=1, label=f"target {_metric(target['metric'])}{needs}")
    ax.set_xscale("log")
    ticks = sorted({*xs, *([at_2x["train_examples"]] if _is_number(at_2x.get("train_examples")) else [])})
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(y=0.15)
    ax.set_xlabel("training examples (log scale)")
    ax.set_ylabel(f"{primary} (test)")
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    return _png(fig)


def _confusion_chart(rung: dict, labels: list[str]) -> str:
    plt = _pyplot()
    matrix = rung["confusion_matrix"]
    n = len(matrix)
    names = labels if len(labels) == n else [str(i) for i in range(n)]
    size = min(2.4 + 0.25 * n, 6)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    ax.imshow(matrix, cmap="Greens")
    peak = max((max(row) for row in matrix if row), default=0)
    if n <= 12:
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                ax.text(j, i, _num(value), ha="center", va="center", fontsize=8,
                        color="white" if peak and value > 0.6 * peak else "black")
    ticks = list(range(n))
    ax.set_xticks(ticks, names, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_yticks(ticks, names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(str(rung.get("name")), fontsize=9)
    return _png(fig)
