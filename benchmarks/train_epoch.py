"""Benchmark: training epochs through the real loop (``cvr-spark train`` in process), seconds and samples/s.

    .venv/bin/python benchmarks/train_epoch.py --rows 2000000 --out benchmarks/results/train_epoch.json
    # the issue's GPU target, on a machine with one: an epoch of 42M rows (Ali-CCP's size) in <= 20 s
    python benchmarks/train_epoch.py --rows 42000000 --out benchmarks/results/train_epoch_gpu.json

What runs is :func:`cvr_spark.train.experiment.run_train` (what ``cvr-spark train`` calls) with
one process and ``device: auto``: the FeatureLoader reads the train split into memory (on a
CUDA machine onto the GPU: the split is device resident and batches are gathered there), then
``--epochs`` epochs of ``--model`` (ESMM, paper preset: embedding 5, towers 128-64-32, batch
2000, row-wise lazy Adam), validation after each epoch, the test evaluation, the report.
``train_throughput.py`` times the step alone on preloaded tensors; this times what a user
waits for, batches from the loader included.

Figures per run: ``epoch_s`` (the training steps of each epoch, loader batches included,
validation not: ``samples / samples_per_s`` of the run's history), ``samples_per_s``, and the
run's ``wall_s`` (reading the splits, validation, test evaluation, report) for context, plus
the test AUCs, so that a faster setting shows it learns as well. With ``--repeats N`` the
settings run in turn N times, in ABBA order (fp32, amp, amp, fp32, ...), and the summary gives
the median and range of each setting's best epoch: this VM's speed drifts by 20 % over
minutes, and the first run of a pair was seen to be faster than the second whichever setting
it was.

Data: ``--data DIR``, a feature job's output, or else a synthetic features table written
under ``--workdir`` in the feature job's Parquet layout (``features/v=0/split=*``, manifest):
``--rows`` train rows plus 2 % as many valid and test rows each, the 18 single-valued fields
with the Ali-CCP vocabulary sizes of ``train_throughput.VOCAB`` (1.1M embedding rows),
Zipf-like ids, ~4 % clicks and ~10 % of clicks converting, at rates that depend on
three low-cardinality fields (so that the test AUCs show whether a setting learns).

Settings (``--settings``): ``fp32``; ``amp`` = ``train.amp=true`` (bfloat16 autocast on CUDA,
or on a CPU with native bfloat16; skipped, and listed as skipped, where
:func:`cvr_spark.train.loop.amp_supported` says autocast would be off); ``compile`` =
``train.compile=true`` (torch.compile of the training forward: the first epoch includes the
compilation, so the best epoch is the one to compare); ``amp+compile`` = both. The JSON also records
the git commit, the command line, the UTC time and the machine (``_provenance.py``).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import _provenance
from train_throughput import VOCAB

SETTINGS = {"fp32": (False, False), "amp": (True, False), "compile": (False, True), "amp+compile": (True, True)}
TARGET_GPU_EPOCH_S = 20.0  # an epoch of 42M rows on one H100
GPU_TARGET_ROWS = 42_000_000
FILE_ROWS = 1_000_000  # rows per Parquet file (as the feature job's rows_per_file)
ROW_GROUP_ROWS = 131_072


def _columns(rng: np.random.Generator, n: int, start: int) -> dict[str, np.ndarray]:
    """``n`` synthetic rows with sample ids from ``start``: one int32 column per field, labels, keys."""
    cols = {f: (v * rng.random(n) ** 3).astype(np.int32).clip(0, v - 1) for f, v in VOCAB.items()}
    # click and conversion rates that depend on low-cardinality fields: signals learnt within an epoch
    lift = 1.0 + 1.5 * (cols["121"] % 3 == 0) + 1.0 * (cols["206"] % 3 == 0)
    click = (rng.random(n) < 0.02 * lift).astype(np.int32)
    conversion = click * (rng.random(n) < np.where(cols["216"] % 4 == 0, 0.2, 0.05)).astype(np.int32)
    return {"sample_id": np.arange(start, start + n, dtype=np.int64), **cols, "click": click,
            "conversion": conversion, "user_key": cols["101"].astype(np.int64),
            "item_key": cols["205"].astype(np.int64)}


def write_synthetic(folder: Path, rows: int, seed: int = 0) -> Path:
    """A features table of ``rows`` train rows (+ 2 % valid, 2 % test) and its manifest in ``folder``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    table_dir = folder / "features"
    start = 0
    for split, n in (("train", rows), ("valid", max(rows // 50, 1000)), ("test", max(rows // 50, 1000))):
        part = table_dir / "v=0" / f"split={split}"
        part.mkdir(parents=True)
        for i, begin in enumerate(range(0, n, FILE_ROWS)):
            size = min(FILE_ROWS, n - begin)
            pq.write_table(pa.table(_columns(rng, size, start)), part / f"part-{i:05d}.parquet",
                           row_group_size=ROW_GROUP_ROWS)
            start += size
    (table_dir / "_latest").write_text("0")
    groups = {"101": "user", "205": "item"}
    fields = [{"name": f, "group": groups.get(f, "context"), "multi": False, "vocab_size": v}
              for f, v in VOCAB.items()]
    manifest = {"fields": fields, "tables": {"features": {"path": "features", "format": "parquet", "version": 0}},
                "synthetic": {"rows": rows, "seed": seed, "by": "benchmarks/train_epoch.py"}}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return folder


def run_setting(data: Path, folder: Path, setting: str, repeat: int, args: argparse.Namespace) -> dict:
    """One run of ``setting`` into ``folder`` (its ``<model>/seed<k>`` run folder, results, report)."""
    from cvr_spark.train.experiment import run_train

    amp, compiled = SETTINGS[setting]
    overrides = [f"train.amp={str(amp).lower()}", f"train.compile={str(compiled).lower()}", "train.progress=false",
                 "train.mlflow=false", "train.patience=0", f"train.num_threads={args.threads}"]
    t0 = time.perf_counter()
    result = run_train(data, [args.model], [args.seed], preset=args.preset, epochs=args.epochs,
                       out_dir=folder, overrides=overrides)
    wall = time.perf_counter() - t0
    (run,) = result["runs"]
    metrics = json.loads((Path(run["run_dir"]) / "metrics.json").read_text())
    epochs = [{"epoch": h["epoch"], "samples": h["samples"], "samples_per_s": h["samples_per_s"],
               "epoch_s": h["samples"] / h["samples_per_s"]} for h in metrics["history"]]
    test = {k: run["metrics"].get(k) for k in ("ctr_auc", "cvr_auc_clicked", "ctcvr_auc")}
    return {"setting": setting, "repeat": repeat, "model": args.model, "preset": args.preset, "epochs": epochs,
            "best_epoch_s": min(e["epoch_s"] for e in epochs),
            "best_samples_per_s": max(e["samples_per_s"] for e in epochs),
            "wall_s": wall, "test": test}


def main() -> None:
    import torch

    from cvr_spark.train.loop import amp_supported, resolve_device

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2_000_000, help="train rows of the synthetic table")
    p.add_argument("--data", default=None, help="a feature job's output instead of the synthetic table")
    p.add_argument("--model", default="esmm")
    p.add_argument("--preset", default="paper")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch threads (train.num_threads)")
    p.add_argument("--settings", default="fp32,amp", help=f"subset of {', '.join(SETTINGS)}")
    p.add_argument("--repeats", type=int, default=1, help="runs per setting, the settings in turn")
    p.add_argument("--workdir", default=None, help="synthetic table and runs (default: a temporary folder)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    provenance = _provenance.run_info()
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        p.error(f"--settings: unknown {unknown}; expected a subset of {', '.join(SETTINGS)}")
    if args.repeats < 1 or args.epochs < 1 or (args.rows < 1 and not args.data):
        p.error("--repeats, --epochs and --rows must be >= 1")
    device = resolve_device("auto")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="train_epoch_"))
    work.mkdir(parents=True, exist_ok=True)
    rows, skipped = [], []
    try:
        if args.data:
            data = Path(args.data)
        else:
            data = work / "data"
            shutil.rmtree(data, ignore_errors=True)
            t0 = time.perf_counter()
            write_synthetic(data, args.rows)
            print(f"synthetic table: {args.rows:,} train rows in {time.perf_counter() - t0:.1f} s", flush=True)
        if not amp_supported(device, "bfloat16"):
            for setting in [s for s in settings if SETTINGS[s][0]]:
                skipped.append(f"{setting}: no native bfloat16 autocast on {device}")
                settings.remove(setting)
        for repeat in range(args.repeats):
            # settings in turn, in ABBA order: a slow spell of the machine, or being the first or
            # the second run of a pair, then hits each setting alike
            for setting in (settings if repeat % 2 == 0 else settings[::-1]):
                gc.collect()  # the previous run's loaders and model
                folder = work / "runs" / setting / f"r{repeat}"
                shutil.rmtree(folder, ignore_errors=True)
                r = run_setting(data, folder, setting, repeat, args)
                rows.append(r)
                per_epoch = ", ".join(f"{e['epoch_s']:.1f} s" for e in r["epochs"])
                print(f"{args.model} {setting:<11} on {device} (repeat {repeat}): best epoch {r['best_epoch_s']:.1f} s, "
                      f"{r['best_samples_per_s']:,.0f} samples/s (epochs: {per_epoch}); run {r['wall_s']:.0f} s; "
                      f"test ctr_auc {r['test']['ctr_auc']:.4f}, ctcvr_auc {r['test']['ctcvr_auc']:.4f}", flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    summary = {}
    for setting in settings:
        rates = [r["best_samples_per_s"] for r in rows if r["setting"] == setting]
        summary[setting] = {"median_best_samples_per_s": statistics.median(rates), "min": min(rates),
                            "max": max(rates), "repeats": len(rates)}
        print(f"{setting:<11}: best epoch per run, median of {len(rates)}: {statistics.median(rates):,.0f} samples/s "
              f"(range {min(rates):,.0f}-{max(rates):,.0f})")
    if device.type == "cuda" and rows:
        best = min(r["best_epoch_s"] * GPU_TARGET_ROWS / r["epochs"][0]["samples"] for r in rows)
        print(f"one GPU, an epoch scaled to {GPU_TARGET_ROWS:,} rows: {best:.1f} s "
              f"(target <= {TARGET_GPU_EPOCH_S:.0f} s: {'met' if best <= TARGET_GPU_EPOCH_S else 'NOT met'})")
    for s in skipped:
        print(f"skipped: {s}")
    result = {"summary": summary, "rows": rows, "skipped": skipped, "repeats": args.repeats,
              "train_rows": args.rows if not args.data else None, "data": args.data, "device": str(device),
              "threads": args.threads, "epochs": args.epochs,
              "vocab": None if args.data else VOCAB, "torch": torch.__version__,
              "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "provenance": provenance, "machine": _provenance.machine_info(("torch", "numpy", "pyarrow")),
              "load_avg": os.getloadavg()}
    if args.out:
        _provenance.write_result(args.out, result)


if __name__ == "__main__":
    main()
