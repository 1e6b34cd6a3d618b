"""Benchmark: simulate then featurise N rows on local[2]; rows/s per stage and peak JVM heap.

    .venv/bin/python benchmarks/features.py --rows 1000000 5000000 --out benchmarks/results/features.json

Each stage of each size runs in a fresh Python process with its own Spark JVM
(``python features.py --one-stage {simulate,features} ROWS --workdir DIR ...``, whose JSON line
the parent collects), so no size profits from code an earlier one compiled. The feature job
runs ``--runs`` times (default 2) in its process: ``features_s`` is the first run, in a JVM
that has only started its Spark session (what ``cvr-spark features`` or a spark-submit of the
job pays, less the JVM and session start-up, ``session_start_s``: Spark SQL's and Delta's
classes, the job's generated code and the JIT's compilation of it are in the figure);
``features_warm_s`` is the fastest later run in the same JVM (a notebook or a long-lived
cluster running the job again). Each run writes a fresh output folder.

JVM memory: in local mode the executor runs inside the driver JVM, so one JVM heap holds both.
During each stage a background Python thread samples that JVM's total heap in use
(``ManagementFactory.getMemoryMXBean().getHeapMemoryUsage().getUsed()`` through py4j) every
``--sample-interval`` seconds (0.2 by default, recorded in the JSON), plus once at the start and
once at the end of the stage; ``jvm_heap_used_peak_mb_sampled_<stage>`` is the largest sample.
It is a lower bound on the true peak (a spike between two samples is missed), and "used"
includes garbage not yet collected, so it tells how much of the heap (``jvm_heap_max_mb``,
set by ``--driver-memory``) the JVM filled, not the live data. Each stage's Python driver's
peak RSS (``ru_maxrss`` of its process) is reported beside it. The JSON also records
the git commit, the command line, the UTC time and the machine (``_provenance.py``); the
Spark master and driver memory are recorded apart from the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import _child
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


def _session(args):
    from cvr_spark.config import SparkConfig
    from cvr_spark.spark import get_spark

    return get_spark(SparkConfig(master=args.master, driver_memory=args.driver_memory, shuffle_partitions=8))


def run_stage(args) -> dict:
    """One stage of one size in this process (``--one-stage``): its figures as a dict."""
    stage, rows = args.one_stage[0], int(args.one_stage[1])
    work = Path(args.workdir)
    raw = work / f"raw_{rows}"
    t0 = time.perf_counter()
    spark = _session(args)
    spark.range(1).count()  # the session is up (jars loaded, executor started)
    out: dict = {"session_start_s": round(time.perf_counter() - t0, 2)}
    if stage == "simulate":
        from cvr_spark.data.simulator import preset_config, simulate

        with HeapSampler(spark, args.sample_interval) as heap:
            t0 = time.perf_counter()
            simulate(spark, preset_config(args.preset, output=str(raw), rows=rows, seed=1))
            out["seconds"] = [round(time.perf_counter() - t0, 2)]
        out["heap_peak_mb"] = round(heap.peak_mb)
        out["heap_samples"], out["heap_failed"] = heap.samples, heap.errors
    else:
        from cvr_spark.data.features import FeaturesConfig, run_features

        out["seconds"], peaks, samples, failed = [], [], 0, 0
        for i in range(args.runs):
            feat = work / f"feat_{rows}_{i}"
            with HeapSampler(spark, args.sample_interval) as heap:
                t0 = time.perf_counter()
                manifest = run_features(spark, FeaturesConfig(source="aliccp-raw", input=str(raw), output=str(feat),
                                                              parser=args.parser))
                out["seconds"].append(round(time.perf_counter() - t0, 2))
            peaks.append(round(heap.peak_mb))
            samples, failed = samples + heap.samples, failed + heap.errors
            shutil.rmtree(feat, ignore_errors=True)
        out["heap_peak_mb"], out["heap_samples"], out["heap_failed"] = max(peaks), samples, failed
        out["rows_in"] = sum(manifest["rows_in"].values())
        out["rows_out"], out["rejects"] = manifest["rows"], manifest["rejects"]
        out["parser"] = manifest["parser"]  # the raw line parser that ran (jvm / sql)
    jvm = spark._jvm
    out["jvm_heap_max_mb"] = round(jvm.java.lang.Runtime.getRuntime().maxMemory() / 2**20)
    out["java"] = str(jvm.java.lang.System.getProperty("java.version"))
    # the JVM's own heap, GC and JIT flags (-X..., -XX:...), as the JVM got them
    jvm_args = [str(a) for a in jvm.java.lang.management.ManagementFactory.getRuntimeMXBean().getInputArguments()]
    out["jvm_options"] = " ".join(a for a in jvm_args if a.startswith(("-XX:", "-Xm", "-Xs")))
    out["spark_default_parallelism"] = spark.sparkContext.defaultParallelism
    out["python_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def run_stage_subprocess(stage: str, rows: int, work: Path, args) -> dict:
    """:func:`run_stage` in a fresh interpreter (and JVM); its result is the last line of its stdout."""
    cmd = [sys.executable, os.path.abspath(__file__), "--one-stage", stage, str(rows), "--workdir", str(work),
           "--master", args.master, "--driver-memory", args.driver_memory, "--preset", args.preset,
           "--sample-interval", str(args.sample_interval), "--runs", str(args.runs), "--parser", args.parser]
    return _child.run_json_child(cmd, f"stage {stage} at {rows} rows")


def run_size(rows: int, work: Path, args) -> tuple[dict, dict]:
    """Simulate, then featurise ``rows`` rows, each in its own process: the size's figures, and
    the feature process's JVM facts (heap max, Java version, heap/GC/JIT flags, default parallelism)."""
    sim = run_stage_subprocess("simulate", rows, work, args)
    feat = run_stage_subprocess("features", rows, work, args)
    shutil.rmtree(work / f"raw_{rows}", ignore_errors=True)
    t_sim, t_cold = sim["seconds"][0], feat["seconds"][0]
    t_warm = min(feat["seconds"][1:]) if len(feat["seconds"]) > 1 else None
    n_in = feat["rows_in"]
    figures = {
        "rows": rows,
        "simulate_s": t_sim, "simulate_rows_per_s": round(rows / t_sim),
        "features_s": t_cold, "features_rows_per_s": round(n_in / t_cold),
        "raw_to_features_rows_per_s": round(n_in / t_cold),
        "features_warm_s": t_warm, "features_warm_rows_per_s": round(n_in / t_warm) if t_warm else None,
        "features_runs_s": feat["seconds"],
        "simulate_plus_features_rows_per_s": round(rows / (t_sim + t_cold)),
        "session_start_s": {"simulate": sim["session_start_s"], "features": feat["session_start_s"]},
        "jvm_heap_used_peak_mb_sampled_simulate": sim["heap_peak_mb"],
        "jvm_heap_used_peak_mb_sampled_features": feat["heap_peak_mb"],
        "jvm_heap_samples": {"simulate": sim["heap_samples"], "features": feat["heap_samples"],
                             "failed": sim["heap_failed"] + feat["heap_failed"]},
        "python_peak_rss_mb": {"simulate": sim["python_peak_rss_mb"], "features": feat["python_peak_rss_mb"]},
        "rows_out": feat["rows_out"], "rejects": feat["rejects"], "parser": feat["parser"],
    }
    return figures, {k: feat[k] for k in ("jvm_heap_max_mb", "java", "jvm_options", "spark_default_parallelism")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 5_000_000])
    ap.add_argument("--master", default="local[2]")
    # The feature job's own setting (conf/features.yaml). With 6g the parsed rows of 10M input rows
    # (about 3.4 GB kept deserialized) outgrew Spark's storage memory and part went to disk: the
    # warm run was 7-24 % slower per row than at 5M; with 8g it is faster per row (README).
    ap.add_argument("--driver-memory", default="8g",
                    help="the local JVM's heap (default %(default)s, as conf/features.yaml)")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--runs", type=int, default=2,
                    help="feature-job runs per size in one JVM: the first is cold, the fastest later one warm")
    ap.add_argument("--parser", choices=["auto", "jvm", "sql"], default="auto",
                    help="the raw line parser (features.parser; default %(default)s: the JVM UDF where it builds)")
    ap.add_argument("--sample-interval", type=float, default=SAMPLE_INTERVAL_S,
                    help="seconds between JVM heap samples (default %(default)s)")
    ap.add_argument("--out", default="benchmarks/results/features.json")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir, removed)")
    ap.add_argument("--one-stage", nargs=2, metavar=("STAGE", "ROWS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    if args.one_stage:
        if args.one_stage[0] not in ("simulate", "features") or args.workdir is None:
            ap.error("--one-stage takes simulate|features ROWS and needs --workdir")
        print(json.dumps(run_stage(args)), flush=True)
        return
    provenance = _provenance.run_info()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cvr-bench-"))
    results, jvm = [], {}
    try:
        for n in args.rows:
            r, jvm = run_size(n, work, args)
            print(json.dumps(r), flush=True)
            results.append(r)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    machine = _provenance.machine_info(("pyspark", "delta-spark", "pyarrow", "pandas", "numpy"))
    machine["java"] = jvm.get("java")
    payload = {
        "benchmark": "features", "master": args.master, "driver_memory": args.driver_memory,
        "spark_default_parallelism": jvm.get("spark_default_parallelism"),
        "preset": args.preset, "stage_isolation": "subprocess", "feature_runs_per_size": args.runs,
        "parser_requested": args.parser,
        "jvm_heap_max_mb": jvm.get("jvm_heap_max_mb"), "jvm_options": jvm.get("jvm_options"),
        "jvm_heap_sample_interval_s": args.sample_interval,
        "jvm_heap_note": "jvm_heap_used_peak_mb_sampled_*: max of total JVM heap used "
                         "(MemoryMXBean.getHeapMemoryUsage().getUsed()) sampled every "
                         f"{args.sample_interval} s during the stage (over all of its runs); "
                         "a lower bound on the true peak",
        "provenance": provenance,
        "machine": machine,
        "results": results,
    }
    _provenance.write_result(args.out, payload)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
