"""Delta / Parquet table I/O with versions and atomic publish.

* **Delta** (default): every write is a new table version in ``_delta_log``; a write that
  fails before its commit leaves the previous version as the current one, readable.
  Readers can pin ``version``.
* **Parquet**: versions are emulated with one folder per version, ``<path>/v=<N>/``, and a
  ``<path>/_latest`` pointer file replaced atomically (``os.replace``) only after the data
  of the new version is fully written. Readers follow the pointer or pin ``version``.
  The pointer lives on the driver's file system: use Delta for object stores.

Also: :func:`even_files` (one evenly sized file per group and partition value) and
:func:`write_json_atomic` (temp file + ``os.replace``, for manifests written last).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

FORMATS = ("delta", "parquet")
_LATEST = "_latest"


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"table format must be one of {FORMATS}, got {fmt!r}")


def _remote(path: str) -> bool:
    return "://" in path or path.startswith("dbfs:")


def local_path(path: str | Path) -> Optional[str]:
    """``path`` on this machine's file system (``file:`` URIs included), or None for a remote URI
    (``s3://``, ``hdfs://``, ``abfss://``, ``dbfs:`` ...), which Python's file functions cannot open."""
    path = str(path)
    if path.startswith("file://"):
        return path[len("file://"):] or "/"
    if path.startswith("file:"):
        return path[len("file:"):]
    return None if _remote(path) else path


def join(base: str | Path, *names: str) -> str:
    """``base/names...`` as text: unlike ``pathlib.Path``, keeps a URI's ``//`` (``s3://b/x``)."""
    out = str(base)
    for name in names:
        out = out.rstrip("/") + "/" + name
    return out


def _hadoop_fs(spark: Any, path: str) -> tuple[Any, Any]:
    if spark is None or getattr(spark, "_jvm", None) is None:
        raise ValueError(f"writing to the remote path {path} needs a classic SparkSession (the JVM's "
                         "Hadoop file system); under Spark Connect give a local or mounted path (/dbfs/, /Volumes/)")
    hpath = spark._jvm.org.apache.hadoop.fs.Path(path)
    return hpath.getFileSystem(spark._jsc.hadoopConfiguration()), hpath


def write_text(path: str | Path, text: str, spark: Any = None) -> None:
    """Write ``text`` to ``path``: a local path (or ``file:`` URI) through a temp file and
    ``os.replace`` (readers see the old file or the new one); a remote URI through Spark's Hadoop
    file system, as a temp file renamed over the old one (delete, then rename: object stores have
    no atomic replace)."""
    local = local_path(path)
    if local is not None:
        target = Path(local)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        return
    _hadoop_write_text(spark, str(path), text)


def _hadoop_write_text(spark: Any, path: str, text: str) -> None:
    fs, target = _hadoop_fs(spark, path)
    tmp = spark._jvm.org.apache.hadoop.fs.Path(target.getParent(), f".{target.getName()}.tmp")
    stream = fs.create(tmp, True)
    try:
        stream.write(bytearray(text.encode("utf-8")))
    finally:
        stream.close()
    if fs.exists(target):
        fs.delete(target, False)
    if not fs.rename(tmp, target):
        raise OSError(f"could not rename {tmp.toString()} to {path}")


def read_text(path: str | Path, spark: Any = None) -> Optional[str]:
    """The text of the file at ``path`` (local, ``file:`` or remote through Spark), None if absent."""
    local = local_path(path)
    if local is not None:
        return Path(local).read_text() if Path(local).exists() else None
    fs, target = _hadoop_fs(spark, str(path))
    if not fs.exists(target):
        return None
    stream = fs.open(target)
    try:
        reader = spark._jvm.java.io.BufferedReader(spark._jvm.java.io.InputStreamReader(stream, "UTF-8"))
        return "\n".join(iter(reader.readLine, None))
    finally:
        stream.close()


def is_delta(path: str | Path, spark: Any = None) -> bool:
    """True if ``path`` holds a Delta table (remote paths are asked through ``spark``)."""
    path = str(path)
    if _remote(path):
        if spark is None:
            raise ValueError(f"checking the remote path {path} for a Delta table needs a SparkSession")
        from delta.tables import DeltaTable

        return bool(DeltaTable.isDeltaTable(spark, path))
    return (Path(local_path(path)) / "_delta_log").is_dir()


def table_version(spark, path: str | Path, fmt: str = "delta") -> Optional[int]:
    """The current version of the table at ``path`` (None if there is no table yet)."""
    _check_format(fmt)
    path = str(path)
    if fmt == "delta":
        if not is_delta(path, spark):
            return None
        if local_path(path) is not None:  # the newest commit file, without a Spark job
            log_dir = Path(local_path(path)) / "_delta_log"
            commits = [int(p.stem) for p in log_dir.glob("*.json") if p.stem.isdigit()]
            if commits:
                return max(commits)
        from delta.tables import DeltaTable

        row = DeltaTable.forPath(spark, path).history(1).select("version").first()
        return int(row["version"])
    pointer = read_text(join(path, _LATEST), spark)
    return int(pointer.strip()) if pointer is not None else None


def write_table(
    df, path: str | Path, fmt: str = "delta", num_files: Optional[int] = None,
    partition_by: Optional[list[str]] = None, delta_properties: Optional[dict[str, str]] = None,
) -> int:
    """Write ``df`` as a new version of the table at ``path``; return that version.

    Args:
        num_files: repartition to this many (evenly sized, round-robin) files first.
        partition_by: Hive-style partition columns.
        delta_properties: Delta table properties (``delta.*``) set by this write; ignored for
            Parquet.
    """
    _check_format(fmt)
    spark = df.sparkSession
    if num_files:
        df = df.repartition(int(num_files))
    path = str(path)
    if fmt == "delta":
        writer = df.write.format("delta").mode("overwrite").option("overwriteSchema", "true")
        for key, value in (delta_properties or {}).items():
            writer = writer.option(key, value)
        if partition_by:
            writer = writer.partitionBy(*partition_by)
        writer.save(path)
        return table_version(spark, path, "delta")
    prev = table_version(spark, path, "parquet")
    version = 0 if prev is None else prev + 1
    writer = df.write.mode("overwrite")
    if partition_by:
        writer = writer.partitionBy(*partition_by)
    writer.parquet(join(path, f"v={version}"))
    write_text(join(path, _LATEST), str(version), spark)
    return version


def read_table(spark, path: str | Path, fmt: str = "delta", version: Optional[int] = None):
    """Read the table at ``path`` (the current version, or ``version`` if given).

    Raises:
        FileNotFoundError: no table at ``path`` (or not of the given format).
    """
    _check_format(fmt)
    path = str(path)
    if fmt == "delta":
        if not is_delta(path, spark):
            raise FileNotFoundError(f"no Delta table at {path} (no _delta_log folder)")
        reader = spark.read.format("delta")
        if version is not None:
            reader = reader.option("versionAsOf", int(version))
        return reader.load(path)
    if version is None:
        version = table_version(spark, path, "parquet")
        if version is None:
            raise FileNotFoundError(f"no Parquet table at {path} (no {_LATEST} pointer)")
    return spark.read.parquet(join(path, f"v={version}"))


def parquet_files(path: str | Path, fmt: str = "delta", version: Optional[int] = None) -> list[str]:
    """The Parquet data files of one table version, without Spark (for the trainer).

    Delta snapshots are resolved with the ``deltalake`` package (the ``_delta_log``).
    """
    _check_format(fmt)
    path = str(path)
    if fmt == "delta":
        from deltalake import DeltaTable

        dt = DeltaTable(path, version=version)
        return list(dt.file_uris())
    if version is None:
        pointer = Path(path) / _LATEST
        if not pointer.exists():
            raise FileNotFoundError(f"no Parquet table at {path} (no {_LATEST} pointer)")
        version = int(pointer.read_text().strip())
    root = Path(path) / f"v={version}"
    return sorted(str(p) for p in root.rglob("*.parquet"))



def _partition_keys(spark: Any, n: int) -> list[int]:
    """For each shuffle partition p < n, a long key with ``pmod(hash(key), n) == p``.

    ``hash`` is Spark's Murmur3 (seed 42), the one its hash partitioning uses, so
    ``repartition(n, key_column)`` sends the rows of key p to task p, and to no other.
    """
    from pyspark.sql import functions as F

    rows = (spark.range(64 * n).select("id", F.pmod(F.hash("id"), F.lit(n)).alias("p"))
            .groupBy("p").agg(F.min("id").alias("k")).collect())
    keys = {int(r["p"]): int(r["k"]) for r in rows}
    if len(keys) < n:
        raise RuntimeError(f"found partition keys for only {len(keys)} of {n} partitions")
    return [keys[p] for p in range(n)]


def even_files(df, partition_col: str, rows_by_value: dict[str, int], rows_per_file: int,
               hash_col: str, seed: int = 0):
    """Repartition ``df`` so that a partitioned write gives evenly sized files.

    A value of ``partition_col`` with R rows gets ceil(R / rows_per_file) file groups; rows
    join a group by ``xxhash64(hash_col, seed)``; every group goes to its own task, so each
    written file is one group of about ``rows_per_file`` rows (a plain
    ``repartition(n, cols)`` would let hash collisions merge groups into double-size files).
    """
    from pyspark.sql import functions as F

    counts = {v: max(1, math.ceil(r / rows_per_file)) for v, r in sorted(rows_by_value.items()) if r > 0}
    if not counts:
        return df.repartition(1)
    offsets, total = {}, 0
    for v, k in counts.items():
        offsets[v], total = total, total + k
    keys = _partition_keys(df.sparkSession, total)

    def lit_map(d: dict):
        return F.create_map(*[F.lit(x) for kv in d.items() for x in kv])

    group = F.pmod(F.xxhash64(F.col(hash_col), F.lit(int(seed))), lit_map(counts)[F.col(partition_col)])
    fid = (lit_map(offsets)[F.col(partition_col)] + group).cast("int")
    keyed = df.withColumn("_file_key", lit_map(dict(enumerate(keys)))[fid])
    return keyed.repartition(total, "_file_key").drop("_file_key")


def write_json_atomic(path: str | Path, obj: Any, spark: Any = None) -> None:
    """Write ``obj`` as JSON to ``path`` with :func:`write_text` (local: temp file + ``os.replace``,
    readers see the old file or the new one; remote URIs through ``spark``'s Hadoop file system)."""
    write_text(path, json.dumps(obj, indent=2, default=str), spark)
