"""Benchmark: simulate then featurise N rows on local[2]; rows/s per stage and peak JVM memory.

    .venv/bin/python benchmarks/features.py --rows 1000000 5000000 --out benchmarks/results/features.json

In local mode the executor runs inside the driver JVM, so "driver" and "executor" peak heap
are the same JVM's heap pools (peak usage, reset before each stage); the Python driver's
peak RSS is reported beside it.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path


def _jvm_peak_reset(spark) -> None:
    mf = spark._jvm.java.lang.management.ManagementFactory
    for pool in mf.getMemoryPoolMXBeans():
        pool.resetPeakUsage()


def _jvm_peak_heap_mb(spark) -> float:
    mf = spark._jvm.java.lang.management.ManagementFactory
    total = 0
    for pool in mf.getMemoryPoolMXBeans():
        if str(pool.getType().toString()) == "Heap memory":
            total += pool.getPeakUsage().getUsed()
    return total / 2**20


def run_size(spark, rows: int, work: Path, preset: str) -> dict:
    from cvr_spark.data.features import FeaturesConfig, run_features
    from cvr_spark.data.simulator import preset_config, simulate

    raw, feat = work / f"raw_{rows}", work / f"feat_{rows}"
    _jvm_peak_reset(spark)
    t0 = time.perf_counter()
    simulate(spark, preset_config(preset, output=str(raw), rows=rows, seed=1))
    t_sim = time.perf_counter() - t0
    sim_peak = _jvm_peak_heap_mb(spark)

    _jvm_peak_reset(spark)
    t0 = time.perf_counter()
    manifest = run_features(spark, FeaturesConfig(source="aliccp-raw", input=str(raw), output=str(feat)))
    t_feat = time.perf_counter() - t0
    feat_peak = _jvm_peak_heap_mb(spark)
    n_in = sum(manifest["rows_in"].values())
    return {
        "rows": rows,
        "simulate_s": round(t_sim, 2), "simulate_rows_per_s": round(rows / t_sim),
        "features_s": round(t_feat, 2), "features_rows_per_s": round(n_in / t_feat),
        "raw_to_features_rows_per_s": round(n_in / t_feat),
        "simulate_plus_features_rows_per_s": round(rows / (t_sim + t_feat)),
        "jvm_peak_heap_mb_simulate": round(sim_peak), "jvm_peak_heap_mb_features": round(feat_peak),
        "rows_out": manifest["rows"], "rejects": manifest["rejects"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 5_000_000])
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--driver-memory", default="6g")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--out", default="benchmarks/results/features.json")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir, removed)")
    args = ap.parse_args()

    from cvr_spark.config import SparkConfig
    from cvr_spark.spark import get_spark

    spark = get_spark(SparkConfig(master=args.master, driver_memory=args.driver_memory,
                                  shuffle_partitions=8))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cvr-bench-"))
    results = []
    try:
        for n in args.rows:
            r = run_size(spark, n, work, args.preset)
            print(json.dumps(r), flush=True)
            results.append(r)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    payload = {
        "benchmark": "features", "master": args.master, "driver_memory": args.driver_memory,
        "machine": f"{platform.node()} {platform.machine()} cpus={spark.sparkContext.defaultParallelism}",
        "python_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
