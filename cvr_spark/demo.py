"""The one-command demo: simulate -> features -> graphs -> train a representative set -> report.

Every stage writes under ``out_dir`` and is skipped when its output is already there
(``rebuild=True`` redoes everything). Runs on the embedded default: local Spark and the
simulator's ``small`` preset, so the ground-truth CVR metrics are available.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping

from cvr_spark.config import Config

# A representative set (issue: MLP, ESMM, AITM, ESCM2-IPW, CSTWA, a CTnoCVR variant, ChorusCVR).
DEMO_MODELS = ["mlp", "esmm", "aitm", "escm2_ipw", "cstwa", "esmm+ctnocvr", "chorus"]
DEMO_ROWS = 200_000


def summarize_manifest(manifest: Mapping[str, Any]) -> str:
    """A short human-readable summary of a feature job manifest."""
    lines = [f"features: {manifest['tables']['features']['path']} "
             f"({manifest['tables']['features']['format']} v{manifest['tables']['features']['version']})"]
    for split, n in manifest["rows"].items():
        rates = manifest.get("label_rates", {}).get(split, {})
        rate_txt = ", ".join(f"{k}={v:.4f}" for k, v in rates.items())
        lines.append(f"  {split:<5} rows={n:>10,}  {rate_txt}")
    rejects = manifest.get("rejects", {})
    lines.append(f"  rejects: {sum(rejects.values()):,} " + (json.dumps(rejects) if rejects else ""))
    vocab = ", ".join(f"{f['name']}:{f['vocab_size']}" for f in manifest["fields"])
    lines.append(f"  vocab sizes: {vocab}")
    return "\n".join(lines)


def demo_graph_config(feat_dir: Path, graph_dir: Path, force: bool = False):
    """The graph job as the demo runs it: pre-train the CTR model with the ``fast`` preset (at
    most 3 epochs), exact top-8 (FAISS on a GPU if one is seen). Unchanged inputs keep the
    published version; ``force`` (the demo's ``--rebuild``) publishes a new one."""
    from cvr_spark.graph.job import GraphConfig
    from cvr_spark.graph.pretrain import PretrainConfig

    return GraphConfig(data=str(feat_dir), output=str(graph_dir), format="delta",
                       force=force, pretrain=PretrainConfig(preset="fast", epochs=3, seed=1))


def _stage(name: str, i: int, n: int) -> float:
    print(f"[{i}/{n}] {name} ...", flush=True)
    return time.time()


def _done(t0: float, what: str = "") -> None:
    print(f"      done in {time.time() - t0:.1f}s {what}", flush=True)


def demo_simulation(cfg: Config, output: str, rows: int | None = None, preset: str | None = None) -> Any:
    """The demo's simulator settings: preset ``preset`` (default ``small``, or a preset other than
    the default given as ``simulate.preset``), every ``simulate.*`` knob set in ``cfg`` on top, rows
    ``rows`` (else ``simulate.rows``, else :data:`DEMO_ROWS`)."""
    import dataclasses

    from cvr_spark.data.simulator import SimulateConfig

    sim = cfg.simulate
    if preset is None:  # `simulate.preset=default` cannot be told from no override: use --preset
        preset = "small" if sim.preset == SimulateConfig.preset else sim.preset
    chosen = dataclasses.replace(sim, preset=preset, output=output, rows=rows or sim.rows or DEMO_ROWS)
    return chosen.resolved()


def run_demo(cfg: Config, out_dir: str = "runs/demo", rows: int | None = None,
             rebuild: bool = False, models: list[str] | None = None, preset: str | None = None) -> dict:
    """Run the whole pipeline on simulated data; returns the paths of what it built."""
    from cvr_spark.data.features import run_features
    from cvr_spark.data.simulator import simulate
    from cvr_spark.graph.job import run_graph
    from cvr_spark.spark import get_spark

    out = Path(out_dir).resolve()
    raw_dir, feat_dir, train_dir = out / "raw", out / "features", out / "runs"
    graph_dir = feat_dir / "graphs"  # where training looks by default (<data>/graphs)
    n_stages = 4
    t_all = time.time()
    t0 = _stage("starting Spark", 0, n_stages)
    spark = get_spark(cfg.spark)
    _done(t0)

    t0 = _stage(f"simulate -> {raw_dir}", 1, n_stages)
    if rebuild or not (raw_dir / "summary.json").exists():
        sim_cfg = demo_simulation(cfg, str(raw_dir), rows, preset)
        summary = simulate(spark, sim_cfg)
        (raw_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        _done(t0)
    else:
        _done(t0, "(reused)")

    t0 = _stage(f"features -> {feat_dir}", 2, n_stages)
    manifest_path = feat_dir / "manifest.json"
    if rebuild or not manifest_path.exists():
        fcfg = cfg.features
        fcfg.source, fcfg.input, fcfg.output = "aliccp-raw", str(raw_dir), str(feat_dir)
        manifest = run_features(spark, fcfg)
        _done(t0)
    else:
        manifest = json.loads(manifest_path.read_text())
        _done(t0, "(reused)")
    print(summarize_manifest(manifest))

    t0 = _stage(f"graph (pre-train CTR, FAISS top-K) -> {graph_dir}", 3, n_stages)
    entry = run_graph(spark, demo_graph_config(feat_dir, graph_dir, rebuild))
    _done(t0, f"(graph version {entry['graph_version']}{', reused' if entry['skipped'] else ''}: "
              f"{entry['user']['edges']:,} user / {entry['item']['edges']:,} item edges)")

    t0 = _stage(f"train + evaluate -> {train_dir}", 4, n_stages)
    from cvr_spark.train.experiment import run_train

    # Finished runs are kept (the loop resumes them as done) unless asked to rebuild.
    result = run_train(str(feat_dir), models or DEMO_MODELS, [1], "fast", None, 1, str(train_dir),
                       overrides=[f"train.resume={str(not rebuild).lower()}"], graph_dir=str(graph_dir))
    _done(t0)
    report = train_dir / "results.md"
    if report.exists():
        print(report.read_text())
    print(f"demo finished in {time.time() - t_all:.1f}s; report: {train_dir}")
    return {"raw": str(raw_dir), "features": str(feat_dir), "runs": str(train_dir), "train": result}
