"""The SparkSession: reuse an active one, else start a local one with Delta enabled.

* spark-submit / a notebook: an active session exists and is returned as it is.
* Databricks (``DATABRICKS_RUNTIME_VERSION`` set): Delta is native; no jars are added.
* Local: ``local[*]`` (config) with the Delta jars of the installed ``delta-spark`` version.
  The jars are fetched once from Maven Central with ``mvn dependency:copy`` into
  ``spark.jars_cache`` and passed as ``spark.jars``, so later runs start offline; where
  ``mvn`` is missing, Spark's own ``spark.jars.packages`` (Ivy, cached under the same
  folder) resolves them instead.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from cvr_spark.config import SparkConfig

log = logging.getLogger(__name__)

DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"


def delta_version(cfg: SparkConfig) -> str:
    """The Delta jar version: the config's, else the installed delta-spark package's."""
    if cfg.delta_version:
        return cfg.delta_version
    try:
        return metadata.version("delta-spark")
    except metadata.PackageNotFoundError:
        raise RuntimeError("delta-spark is not installed: pip install 'cvr-spark[spark]' (the pinned "
                           "pyspark + delta-spark pair), or set spark.delta_version") from None


def delta_artifacts(cfg: SparkConfig) -> list[str]:
    """Maven coordinates of the two Delta jars (``group:artifact:version``)."""
    v = delta_version(cfg)
    return [f"io.delta:delta-spark_{cfg.scala_suffix}:{v}", f"io.delta:delta-storage:{v}"]


def _jar_name(coord: str) -> str:
    _, artifact, version = coord.split(":")
    return f"{artifact}-{version}.jar"


def ensure_delta_jars(cfg: SparkConfig) -> list[Path] | None:
    """Local paths of the Delta jars, fetching missing ones with Maven; None if mvn is absent.

    Raises:
        RuntimeError: mvn ran but could not fetch a jar (the message carries mvn's error).
    """
    cache = Path(os.path.expanduser(cfg.jars_cache))
    cache.mkdir(parents=True, exist_ok=True)
    paths = []
    for coord in delta_artifacts(cfg):
        path = cache / _jar_name(coord)
        if not path.exists():
            mvn = shutil.which("mvn")
            if mvn is None:
                return None
            log.info("fetching %s into %s", coord, cache)
            proc = subprocess.run(
                [mvn, "-q", "-B", "dependency:copy", f"-Dartifact={coord}", f"-DoutputDirectory={cache}"],
                capture_output=True, text=True, cwd=cache,
            )
            if proc.returncode != 0 or not path.exists():
                tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
                raise RuntimeError(f"could not fetch Delta jar {coord} with mvn:\n{tail}")
        paths.append(path)
    return paths


def on_databricks() -> bool:
    return "DATABRICKS_RUNTIME_VERSION" in os.environ


def under_spark_submit() -> bool:
    """True in a driver started by spark-submit (or the pyspark shell): the JVM is already up
    with the user's --master / --packages, which this module must not override."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def local_java_options(cfg: SparkConfig) -> str:
    """The local driver JVM's options: ``cfg.jvm_options``, and with ``cfg.fixed_heap`` an
    initial heap of ``cfg.driver_memory`` (``-Xms``; Spark sets ``-Xmx`` from it).

    Raises:
        ValueError: ``driver_memory`` is not a whole number of MiB (digits alone, Spark's
        unit for driver memory) or of k/m/g/t (with an optional ``b``, as Spark writes them).
    """
    if not cfg.fixed_heap:
        return cfg.jvm_options
    size = re.fullmatch(r"(\d+)(?:([kmgt])b?)?", cfg.driver_memory.strip().lower())
    if size is None:
        raise ValueError(f"spark.driver_memory '{cfg.driver_memory}' is not a memory size "
                         "(expected e.g. 4g, 512m, 4096)")
    return f"{cfg.jvm_options} -Xms{size.group(1)}{size.group(2) or 'm'}".strip()


def get_spark(cfg: SparkConfig | None = None):
    """Return the active SparkSession, or start one with Delta per ``cfg``.

    Under spark-submit the session is built from spark-submit's settings (only Delta's SQL
    extension is added); on Databricks nothing is added; elsewhere a local session starts.
    """
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise RuntimeError("pyspark is not installed: pip install 'cvr-spark[spark]' locally; clusters "
                           "(Databricks, spark-submit) provide their own") from None

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    cfg = cfg or SparkConfig()
    builder = SparkSession.builder.appName(cfg.app_name)
    if under_spark_submit() and not on_databricks():
        # Master, memory and jars come from spark-submit; Delta still needs its SQL hooks.
        builder = builder.config("spark.sql.extensions", DELTA_EXTENSION).config(
            "spark.sql.catalog.spark_catalog", DELTA_CATALOG)
    elif not on_databricks():
        # Python workers must run this interpreter (the venv with numpy/torch), not whatever
        # ``python3`` is first on PATH; a user's PYSPARK_PYTHON still wins.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        builder = (
            builder.master(cfg.master)
            .config("spark.driver.memory", cfg.driver_memory)
            .config("spark.driver.extraJavaOptions", local_java_options(cfg))
            .config("spark.ui.enabled", str(cfg.ui).lower())
            .config("spark.sql.extensions", DELTA_EXTENSION)
            .config("spark.sql.catalog.spark_catalog", DELTA_CATALOG)
            .config("spark.sql.session.timeZone", "UTC")
            .config("spark.ui.showConsoleProgress", "false")
            # Delta reads its log with this many tasks (default 50: slow on small machines).
            .config("spark.databricks.delta.snapshotPartitions", str(cfg.shuffle_partitions))
        )
        jars = ensure_delta_jars(cfg)
        if jars is not None:
            builder = builder.config("spark.jars", ",".join(str(p) for p in jars))
        else:
            ivy = Path(os.path.expanduser(cfg.jars_cache)) / "ivy"
            builder = builder.config("spark.jars.packages", ",".join(delta_artifacts(cfg)))
            builder = builder.config("spark.jars.ivy", str(ivy))
    builder = builder.config("spark.sql.shuffle.partitions", str(cfg.shuffle_partitions))
    for k, v in cfg.extra_conf.items():
        builder = builder.config(k, v)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(cfg.log_level)
    return spark
