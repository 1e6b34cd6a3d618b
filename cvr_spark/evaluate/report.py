"""Comparison reports over models and seeds: Markdown / CSV / JSON tables and two plots.

A run is ``{"model": str, "seed": int, "metrics": compute_metrics(...)}``. Per model and metric
the report gives the mean, the sample standard deviation across seeds (``ddof=1``; NaN with one
run) and ``n``, the number of runs where the metric is defined (NaN runs are left out of
mean and std). Every metric row names its sample space (:data:`METRIC_SPACES`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cvr_spark.evaluate.metrics import METRIC_SPACES, TRUTH_METRICS

AUC_METRICS = ("ctr_auc", "cvr_auc_clicked", "cvr_auc_all", "ctcvr_auc")
COLUMNS = ["model", "metric", "space", "mean", "std", "n"]


def _check_runs(runs: Sequence[dict]) -> None:
    if not runs:
        raise ValueError("no runs to report")
    for i, run in enumerate(runs):
        for key in ("model", "seed", "metrics"):
            if key not in run:
                raise KeyError(f"run {i}: key '{key}' missing (expected model, seed, metrics)")


def _scalars(metrics: dict) -> dict[str, float]:
    """The numeric, scalar metrics of one run (tables, notes and score names left out)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)}


def _metric_order(names: set[str]) -> list[str]:
    known = [m for m in METRIC_SPACES if m in names]
    return known + sorted(names - set(known))


def results_table(runs: list[dict]) -> pd.DataFrame:
    """Mean, std (ddof=1) and n per model and metric, one row each (models in first-seen order).

    Raises:
        KeyError / ValueError: no runs, or a run without ``model`` / ``seed`` / ``metrics``.
    """
    _check_runs(runs)
    long = pd.DataFrame([{"model": r["model"], "seed": r["seed"], "metric": k, "value": v}
                         for r in runs for k, v in _scalars(r["metrics"]).items()])
    if long.empty:
        return pd.DataFrame(columns=COLUMNS)
    stats = long.groupby(["model", "metric"], sort=False)["value"].agg(["mean", "std", "count"])
    stats = stats.rename(columns={"count": "n"}).reset_index()
    models = list(dict.fromkeys(r["model"] for r in runs))
    order = {m: i for i, m in enumerate(_metric_order(set(stats["metric"])))}
    stats["space"] = stats["metric"].map(lambda m: METRIC_SPACES.get(m, ""))
    stats = stats.sort_values(["model", "metric"], key=lambda s: s.map(
        {m: i for i, m in enumerate(models)} if s.name == "model" else order))
    return stats[COLUMNS].reset_index(drop=True)


COUNT_METRICS = ("n_impressions", "n_clicks", "n_conversions", "gauc_users")


def _fmt(mean: float, std: float, n: int, count: bool = False) -> str:
    if math.isnan(mean):
        return "n/a"
    if count and float(mean).is_integer() and (math.isnan(std) or std == 0):
        return f"{int(mean):,}"
    return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def markdown_table(frame: pd.DataFrame) -> str:
    """A Markdown table (``tabulate`` through pandas when installed, else written directly)."""
    try:
        import tabulate  # noqa: F401  (pandas.to_markdown needs it)

        return frame.to_markdown(index=False)
    except ImportError:
        cells = [[str(c) for c in frame.columns]] + [[str(v) for v in row] for row in frame.itertuples(index=False)]
        esc = [[c.replace("|", "\\|") for c in row] for row in cells]
        lines = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join("---" for _ in esc[0]) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in esc[1:]])


def _wide(table: pd.DataFrame) -> pd.DataFrame:
    """metric x model grid of ``mean ± std`` with the sample space of each metric."""
    models = list(dict.fromkeys(table["model"]))
    metrics = _metric_order(set(table["metric"]))
    cell = {(r.model, r.metric): _fmt(r.mean, r.std, r.n, r.metric in COUNT_METRICS) for r in table.itertuples(index=False)}
    rows = [{"metric": m, "sample space": METRIC_SPACES.get(m, ""),
             **{mod: cell.get((mod, m), "—") for mod in models}} for m in metrics]
    return pd.DataFrame(rows)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _check_truth(runs: Sequence[dict], truth_available: bool) -> list[dict]:
    """Runs with truth metrics removed when there is no truth; an error if truth is promised but missing."""
    if truth_available:
        for r in runs:
            if "cvr_auc_true_all" not in r["metrics"] and "cvr_true_mae" not in r["metrics"]:
                raise ValueError(f"run model={r['model']} seed={r['seed']}: truth_available=True but its "
                                 "metrics have no truth metrics (pass truth= to compute_metrics)")
        return list(runs)
    return [{**r, "metrics": {k: v for k, v in r["metrics"].items() if k not in TRUTH_METRICS}} for r in runs]


def write_report(runs: list[dict], out_dir: str | Path, *, truth_available: bool = False,
                 title: str = "cvr-spark results") -> dict[str, Path]:
    """Write ``results.md``, ``results.csv``, ``results.json``, ``auc.png`` and ``pcoc_by_pctr.png``.

    Args:
        runs: ``{"model", "seed", "metrics"}`` dicts (metrics from ``compute_metrics``).
        out_dir: created if missing.
        truth_available: the data has a known truth (simulator); if False, truth metrics are dropped.

    Returns:
        name -> path of every file written.

    Raises:
        KeyError / ValueError: malformed runs, or ``truth_available`` without truth metrics.
    """
    _check_runs(runs)
    runs = _check_truth(runs, truth_available)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = results_table(runs)
    paths = {name: out / name for name in ("results.md", "results.csv", "results.json", "auc.png",
                                           "pcoc_by_pctr.png")}
    table.to_csv(paths["results.csv"], index=False)
    paths["results.json"].write_text(json.dumps(_json_safe(
        {"truth_available": truth_available, "summary": table.to_dict("records"), "runs": runs}), indent=2))
    paths["results.md"].write_text(_markdown(runs, table, truth_available, title))
    _plot_auc(table, truth_available, paths["auc.png"])
    _plot_pcoc_by_pctr(runs, paths["pcoc_by_pctr.png"])
    return paths


def _markdown(runs: Sequence[dict], table: pd.DataFrame, truth_available: bool, title: str) -> str:
    models = list(dict.fromkeys(r["model"] for r in runs))
    seeds = {m: sorted({r["seed"] for r in runs if r["model"] == m}) for m in models}
    scores = {m: sorted({f"{r['metrics'].get('cvr_score', '?')}/{r['metrics'].get('ctcvr_score', '?')}"
                         for r in runs if r["model"] == m}) for m in models}
    lines = [f"# {title}", "", "Mean ± sample std (ddof=1) over seeds; D = all impressions, "
             "O = clicked impressions. AUC is exact over the whole set.", "",
             *[f"- `{m}`: seeds {seeds[m]}; CVR/CTCVR scores {', '.join(scores[m])}" for m in models], "",
             markdown_table(_wide(table)), ""]
    if not truth_available:
        lines += ["Ground-truth metrics omitted: the data has no known truth.", ""]
    notes = sorted({f"`{r['model']}`: {n}" for r in runs for n in r["metrics"].get("notes", [])})
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines)


def _plot_auc(table: pd.DataFrame, truth_available: bool, path: Path) -> None:
    metrics = [m for m in (*AUC_METRICS, *(("cvr_auc_true_all",) if truth_available else ()))
               if m in set(table["metric"])]
    models = list(dict.fromkeys(table["model"]))
    fig = Figure(figsize=(max(6.0, 1.2 * len(models) * max(1, len(metrics)) / 2), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(metrics))
    x = np.arange(len(models))
    for j, metric in enumerate(metrics):
        sub = table[table["metric"] == metric].set_index("model").reindex(models)
        ax.bar(x + (j - (len(metrics) - 1) / 2) * width, sub["mean"].to_numpy(dtype=float), width,
               yerr=np.nan_to_num(sub["std"].to_numpy(dtype=float)), capsize=3, label=metric)
    ax.set_xticks(x, models, rotation=30, ha="right")
    ax.set_ylabel("AUC (mean ± std over seeds)")
    lows = table[table["metric"].isin(metrics)]["mean"].dropna()
    ax.set_ylim(max(0.0, (lows.min() if len(lows) else 0.5) - 0.05), 1.0)
    ax.legend(fontsize=8)
    ax.set_title("AUC per model: ctr/ctcvr on D, cvr on O (clicked) and D (all)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _bucket_means(runs: Sequence[dict], model: str, key: str) -> np.ndarray:
    """Per-bucket mean of ``key`` over the model's seeds (NaN buckets ignored)."""
    rows = [[b[key] for b in r["metrics"].get("pcoc_by_pctr_bucket", [])] for r in runs if r["model"] == model]
    rows = [r for r in rows if r]
    if not rows:
        return np.zeros(0)
    width = max(len(r) for r in rows)
    grid = np.full((len(rows), width), np.nan)  # [seeds, buckets]
    for i, r in enumerate(rows):
        grid[i, :len(r)] = np.array(r, dtype=float)
    with np.errstate(all="ignore"):
        counts = np.isfinite(grid).sum(0)
        return np.where(counts > 0, np.nansum(grid, 0) / np.maximum(counts, 1), np.nan)


def _plot_pcoc_by_pctr(runs: Sequence[dict], path: Path) -> None:
    """CTR and CTCVR PCOC per pCTR quantile bucket, one line per model (cf. ChorusCVR Fig. 3)."""
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, key, label in zip(axes, ("ctr_pcoc", "ctcvr_pcoc"), ("CTR PCOC", "CTCVR PCOC")):
        for model in dict.fromkeys(r["model"] for r in runs):
            values = _bucket_means(runs, model, key)
            if values.size:
                ax.plot(np.arange(1, values.size + 1), values, marker="o", label=model)
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("pCTR quantile bucket (low -> high)")
        ax.set_ylabel(f"{label} (predicted / observed)")
        ax.set_title(f"{label} by pCTR bucket (D)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
