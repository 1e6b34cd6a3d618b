"""The batch jobs under a real ``spark-submit`` (the README's "With spark-submit" path).

Every other test calls the jobs in process, on a session this package starts itself. Here each
job is its own ``spark-submit`` driver, so the session comes from spark-submit's settings
(``cvr_spark.spark.get_spark`` under ``PYSPARK_GATEWAY_PORT``), Delta from ``--jars``, the
Python workers from ``PYSPARK_PYTHON``, and TorchDistributor runs on that session: simulate ->
features (Delta) -> train with 2 processes -> score (Python workers). A job that fails must make
spark-submit exit non-zero with its message (Spark's PythonRunner merges the driver's stderr
into spark-submit's stdout).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _delta_args() -> list[str]:
    """The Delta jars as spark-submit takes them: the cached jars (fetched as the local session
    fetches them), else Maven coordinates resolved by Ivy."""
    from cvr_spark.config import SparkConfig
    from cvr_spark.spark import delta_artifacts, ensure_delta_jars

    cfg = SparkConfig()
    jars = ensure_delta_jars(cfg)
    if jars is not None:
        return ["--jars", ",".join(str(p) for p in jars)]
    ivy = Path(os.path.expanduser(cfg.jars_cache)) / "ivy"
    return ["--packages", ",".join(delta_artifacts(cfg)), "--conf", f"spark.jars.ivy={ivy}"]


def _submit(job: str, *args: str) -> subprocess.CompletedProcess:
    submit = Path(sys.executable).parent / "spark-submit"
    if not submit.is_file():
        pytest.fail(f"{submit} not found: the dev extra installs pyspark, which brings spark-submit")
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    cmd = [str(submit), "--master", "local[2]", "--driver-memory", "1g", *_delta_args(),
           "--conf", "spark.ui.enabled=false", "--conf", "spark.sql.shuffle.partitions=4",
           "--driver-java-options", "-XX:-DontCompileHugeMethods", str(ROOT / "jobs" / job), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _ok(proc: subprocess.CompletedProcess) -> str:
    """The job's stdout, after checking it succeeded (else both streams' tails: spark-submit
    prints the Python driver's stderr, tracebacks included, on its stdout)."""
    assert proc.returncode == 0, (f"{proc.args} exited {proc.returncode}:\nstdout: {proc.stdout[-3000:]}\n"
                                  f"stderr: {proc.stderr[-3000:]}")
    return proc.stdout


def _last_json(stdout: str) -> dict:
    """The last top-level JSON object a job prints (its summary; other output may follow it)."""
    start = stdout.rfind("\n{")
    return json.JSONDecoder().raw_decode(stdout[start + 1 if start >= 0 else 0:])[0]


def test_simulate_features_train_score_under_spark_submit(tmp_path):
    sim, feat, runs = tmp_path / "sim", tmp_path / "feat", tmp_path / "runs"
    _ok(_submit("simulate.py", "--output", str(sim), "--rows", "20000", "--preset", "small", "--seed", "3"))
    assert sorted(p.name for p in sim.glob("*.csv")) == [
        "common_features_test.csv", "common_features_train.csv", "sample_skeleton_test.csv",
        "sample_skeleton_train.csv"]

    # --parser jvm: the session spark-submit made gets the line parser's jar by ADD JAR, or fails
    _ok(_submit("build_features.py", "--input", str(sim), "--output", str(feat), "--min-count", "2",
                "--parser", "jvm"))
    manifest = json.loads((feat / "manifest.json").read_text())
    assert manifest["parser"] == "jvm"
    assert manifest["tables"]["features"]["format"] == "delta"
    assert (feat / "features" / "_delta_log").is_dir()
    rows = manifest["rows"]
    # rows in = rows out + rows rejected, for the raw files spark-submit read
    assert sum(a["rows_in"] for a in manifest["accounting"].values()) == 20000
    for name, a in manifest["accounting"].items():
        assert a["rows_in"] == a["features"] + a["rejects"], (name, a)

    _ok(_submit("train.py", "--data", str(feat), "--model", "esmm", "--preset", "fast", "--epochs", "1",
                "--seeds", "1", "--processes", "2", "--out", str(runs), "train.progress=false",
                "model.batch_size=500"))
    record = json.loads((runs / "esmm" / "seed1" / "metrics.json").read_text())
    assert record["world_size"] == 2  # TorchDistributor's two ranks on spark-submit's session
    assert record["test"]["n_impressions"] == rows["test"]
    assert 0.5 < record["test"]["ctr_auc"] <= 1.0
    assert (runs / "results.md").is_file()

    out = _last_json(_ok(_submit("score.py", "--run", str(runs / "esmm" / "seed1"), "--data", str(feat),
                                 "--split", "test", "--output", str(tmp_path / "predictions"))))
    assert out["rows"] == rows["test"] and out["format"] == "delta", out
    assert (tmp_path / "predictions" / "_delta_log").is_dir()


def test_a_failing_job_exits_non_zero_with_its_message(tmp_path):
    missing = tmp_path / "no-such-folder"
    proc = _submit("build_features.py", "--input", str(missing), "--output", str(tmp_path / "feat"))
    assert proc.returncode == 2
    # spark-submit's PythonRunner merges the driver's stderr into its stdout
    said = proc.stdout + proc.stderr
    assert f"input folder '{missing}' does not exist" in said and "Traceback" not in said, said[-3000:]
    assert not (tmp_path / "feat" / "manifest.json").exists()
