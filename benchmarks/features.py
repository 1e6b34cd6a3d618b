"""Benchmark: simulate then featurise N rows on local[2]; rows/s per stage and peak JVM heap.

    .venv/bin/python benchmarks/features.py --rows 1000000 5000000 --out benchmarks/results/features.json

JVM memory: in local mode the executor runs inside the driver JVM, so one JVM heap holds both.
During each stage a background Python thread samples that JVM's total heap in use
(``ManagementFactory.getMemoryMXBean().getHeapMemoryUsage().getUsed()`` through py4j) every
``--sample-interval`` seconds (0.2 by default, recorded in the JSON), plus once at the start and
once at the end of the stage; ``jvm_heap_used_peak_mb_sampled_<stage>`` is the largest sample.
It is a lower bound on the true peak (a spike between two samples is missed), and "used"
includes garbage not yet collected, so it tells how much of the heap (``jvm_heap_max_mb``,
set by ``--driver-memory``) the JVM filled, not the live data. The Python driver's peak RSS
over the whole run (``ru_maxrss``, all sizes) is reported beside it. The JSON also records
the git commit, the command line, the UTC time and the machine (``_provenance.py``); the
Spark master and driver memory are recorded apart from the machine.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

import _provenance

SAMPLE_INTERVAL_S = 0.2


class HeapSampler:
    """Samples the JVM's total heap used (bytes) from a background thread while a stage runs.

    Use as a context manager around the stage; ``peak_mb`` and ``samples`` are set on exit.
    py4j gives each Python thread its own connection to the gateway, so the samples are taken
    while the main thread is blocked in a Spark job.
    """

    def __init__(self, spark, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self._bean = spark._jvm.java.lang.management.ManagementFactory.getMemoryMXBean()
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.samples = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jvm-heap-sampler", daemon=True)

    def sample(self) -> None:
        try:
            used = int(self._bean.getHeapMemoryUsage().getUsed())
        except Exception:  # a failed sample must not fail the benchmark; counted and reported
            self.errors += 1
            return
        self.peak_bytes = max(self.peak_bytes, used)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> "HeapSampler":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20


def run_size(spark, rows: int, work: Path, preset: str, interval_s: float) -> dict:
    from cvr_spark.data.features import FeaturesConfig, run_features
    from cvr_spark.data.simulator import preset_config, simulate

    raw, feat = work / f"raw_{rows}", work / f"feat_{rows}"
    with HeapSampler(spark, interval_s) as sim_heap:
        t0 = time.perf_counter()
        simulate(spark, preset_config(preset, output=str(raw), rows=rows, seed=1))
        t_sim = time.perf_counter() - t0

    with HeapSampler(spark, interval_s) as feat_heap:
        t0 = time.perf_counter()
        manifest = run_features(spark, FeaturesConfig(source="aliccp-raw", input=str(raw), output=str(feat)))
        t_feat = time.perf_counter() - t0
    n_in = sum(manifest["rows_in"].values())
    return {
        "rows": rows,
        "simulate_s": round(t_sim, 2), "simulate_rows_per_s": round(rows / t_sim),
        "features_s": round(t_feat, 2), "features_rows_per_s": round(n_in / t_feat),
        "raw_to_features_rows_per_s": round(n_in / t_feat),
        "simulate_plus_features_rows_per_s": round(rows / (t_sim + t_feat)),
        "jvm_heap_used_peak_mb_sampled_simulate": round(sim_heap.peak_mb),
        "jvm_heap_used_peak_mb_sampled_features": round(feat_heap.peak_mb),
        "jvm_heap_samples": {"simulate": sim_heap.samples, "features": feat_heap.samples,
                             "failed": sim_heap.errors + feat_heap.errors},
        "rows_out": manifest["rows"], "rejects": manifest["rejects"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 5_000_000])
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--driver-memory", default="6g")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--sample-interval", type=float, default=SAMPLE_INTERVAL_S,
                    help="seconds between JVM heap samples (default %(default)s)")
    ap.add_argument("--out", default="benchmarks/results/features.json")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir, removed)")
    args = ap.parse_args()
    provenance = _provenance.run_info()

    from cvr_spark.config import SparkConfig
    from cvr_spark.spark import get_spark

    spark = get_spark(SparkConfig(master=args.master, driver_memory=args.driver_memory,
                                  shuffle_partitions=8))
    jvm = spark._jvm
    heap_max_mb = round(jvm.java.lang.Runtime.getRuntime().maxMemory() / 2**20)
    java_version = str(jvm.java.lang.System.getProperty("java.version"))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cvr-bench-"))
    results = []
    try:
        for n in args.rows:
            r = run_size(spark, n, work, args.preset, args.sample_interval)
            print(json.dumps(r), flush=True)
            results.append(r)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    machine = _provenance.machine_info(("pyspark", "delta-spark", "pyarrow", "pandas", "numpy"))
    machine["java"] = java_version
    payload = {
        "benchmark": "features", "master": args.master, "driver_memory": args.driver_memory,
        "spark_default_parallelism": spark.sparkContext.defaultParallelism,
        "preset": args.preset,
        "jvm_heap_max_mb": heap_max_mb,
        "jvm_heap_sample_interval_s": args.sample_interval,
        "jvm_heap_note": "jvm_heap_used_peak_mb_sampled_*: max of total JVM heap used "
                         "(MemoryMXBean.getHeapMemoryUsage().getUsed()) sampled every "
                         f"{args.sample_interval} s during the stage; a lower bound on the true peak",
        "python_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "provenance": provenance,
        "machine": machine,
        "results": results,
    }
    _provenance.write_result(args.out, payload)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
