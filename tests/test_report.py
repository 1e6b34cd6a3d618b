"""Reports: files written, mean/std per model and metric, truth handling."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from cvr_spark.evaluate.metrics import METRIC_SPACES, compute_metrics
from cvr_spark.evaluate.report import markdown_table, results_table, write_report


def make_run(model: str, seed: int, truth: bool = False) -> dict:
    rng = np.random.default_rng(seed + (100 if model == "b" else 0))
    n = 300
    click = (rng.random(n) < 0.3).astype(int)
    conv = click * (rng.random(n) < 0.4)
    p_ctr, p_cvr = np.clip(0.2 * click + rng.random(n) * 0.7, 0.01, 0.99), rng.random(n) * 0.9 + 0.05
    pred = {"click": click, "conversion": conv, "p_ctr": p_ctr, "p_cvr": p_cvr, "p_ctcvr": p_ctr * p_cvr,
            "user_key": rng.integers(0, 20, n)}
    t = {"p_cvr_true": rng.random(n) * 0.5, "potential_conversion": np.maximum(conv, rng.random(n) < 0.2)}
    return {"model": model, "seed": seed, "metrics": compute_metrics(pred, truth=t if truth else None)}


@pytest.fixture(scope="module")
def runs() -> list[dict]:
    return [make_run(m, s, truth=True) for m in ("esmm", "b") for s in (1, 2, 3)]


def test_results_table_mean_std(runs):
    table = results_table(runs)
    assert list(table.columns) == ["model", "metric", "space", "mean", "std", "n"]
    assert list(dict.fromkeys(table["model"])) == ["esmm", "b"]
    for model in ("esmm", "b"):
        for metric in ("ctr_auc", "cvr_auc_clicked", "logloss_ctcvr", "pcoc_ctr", "gauc_ctr"):
            vals = [r["metrics"][metric] for r in runs if r["model"] == model]
            row = table[(table["model"] == model) & (table["metric"] == metric)].iloc[0]
            assert row["mean"] == pytest.approx(np.mean(vals))
            assert row["std"] == pytest.approx(np.std(vals, ddof=1))
            assert row["n"] == 3 and row["space"] == METRIC_SPACES[metric]
    assert "notes" not in set(table["metric"]) and "pcoc_by_pctr_bucket" not in set(table["metric"])


def test_nan_runs_left_out_of_mean():
    runs = [{"model": "m", "seed": s, "metrics": {"ctr_auc": v}} for s, v in enumerate([0.7, math.nan, 0.8])]
    row = results_table(runs).iloc[0]
    assert row["mean"] == pytest.approx(0.75) and row["n"] == 2
    single = results_table([{"model": "m", "seed": 0, "metrics": {"ctr_auc": 0.6}}]).iloc[0]
    assert math.isnan(single["std"])
    with pytest.raises(KeyError, match="run 0: key 'metrics' missing"):
        results_table([{"model": "m", "seed": 0}])


def test_write_report_files(runs, tmp_path):
    paths = write_report(runs, tmp_path / "rep", truth_available=True)
    for name in ("results.md", "results.csv", "results.json", "auc.png", "pcoc_by_pctr.png"):
        assert paths[name].is_file() and paths[name].stat().st_size > 0
    for png in ("auc.png", "pcoc_by_pctr.png"):
        assert paths[png].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["results.md"].read_text()
    assert "| metric | sample space | esmm | b |" in md
    assert METRIC_SPACES["cvr_auc_clicked"] in md and METRIC_SPACES["cvr_auc_all"] in md
    assert "cvr_auc_true_all" in md
    csv = pd.read_csv(paths["results.csv"])
    pd.testing.assert_frame_equal(csv, results_table(runs), check_dtype=False)
    data = json.loads(paths["results.json"].read_text())  # strict JSON: NaN written as null
    assert data["truth_available"] is True and len(data["runs"]) == 6
    assert {r["metric"] for r in data["summary"]} >= {"ctr_auc", "cvr_auc_true_all"}


def test_truth_dropped_or_required(runs, tmp_path):
    write_report(runs, tmp_path, truth_available=False)
    assert "cvr_auc_true_all" not in set(pd.read_csv(tmp_path / "results.csv")["metric"])
    assert "omitted" in (tmp_path / "results.md").read_text()
    with pytest.raises(ValueError, match="model=a seed=0: truth_available=True"):
        write_report([make_run("a", 0)], tmp_path, truth_available=True)


def test_markdown_fallback_escapes_pipes():
    text = markdown_table(pd.DataFrame({"metric": ["x"], "space": ["a|b"]}))
    lines = text.splitlines()
    assert lines[0].replace(" ", "") == "|metric|space|" and "a\\|b" in lines[2]
