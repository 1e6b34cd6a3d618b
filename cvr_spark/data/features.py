"""The feature job: canonical frame -> vocabularies, encoded features, labels, splits, manifest.

Stages are pure DataFrame -> DataFrame functions (none creates a SparkSession, none uses a
Python UDF): :func:`canonical_frame` -> :func:`add_keys` -> :func:`build_vocab` (train input
only) -> :func:`encode` -> :func:`add_labels` -> :func:`assign_split` -> :func:`feature_frame`.
:func:`run_features` reads the source, runs them, checks the reject bound and the row
accounting, then publishes ``features/``, ``vocab/``, ``rejects/`` and, last and atomically,
``manifest.json`` under ``cfg.output``.

Decisions where the spec is silent:

* A source-provided valid frame replaces the carve-out: the train input is then all train.
* Random split: ``valid`` iff ``u(key, seed) < valid_fraction``, ``u`` the top-53-bit
  fraction of ``xxhash64(key, seed)``, ``key`` the source's ``_split_key`` column (raw id, or a
  hash of file name and line for sources without ids, whose generated ``sample_id`` depends on
  the partitioning) else ``sample_id``; independent of partitioning, cores and row order.
* ``split_column`` split: rows of the train input with value >= the (1 - valid_fraction)
  ``percentile_approx`` (accuracy ``quantile_accuracy``) are valid; nulls stay train.
  ``split_column: source_file`` splits by input file (a train input of several files, e.g.
  one per day): the last files in name order, as few as hold ``valid_fraction`` of the train
  rows and never every file, are valid (whole files: the fraction is a lower bound); the
  manifest's ``threshold`` is the first valid file's index in name order.
* Missing multi-valued fields encode as an empty array; null elements inside an array as 0.
* Only null is "missing": raw ids are compared as strings, so ``"0"`` is an ordinary id.
* The label contract is checked (0/1, conversion <= click) in the statistics pass; rows
  that break it are an error, never silently dropped (the reader rejects them).
* The rejects table keeps the reader's ``line`` as a string (the raw line text).
* Manifest table paths are relative to ``cfg.output`` (the folder can be moved), except the
  simulator's truth table (``tables.truth``, absolute), registered when a raw Ali-CCP input
  folder holds one (``cvr-spark simulate`` writes ``<output>/truth``).
* Publishing order: features, vocab, rejects, manifest. A run that fails part-way may leave
  a new version in some tables, but the manifest still names the previous versions, which
  stay readable (Delta time travel / Parquet ``v=<N>`` folders).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import reduce
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, NumericType, StringType

from cvr_spark.data.fields import ITEM_KEY_FIELD, USER_KEY_FIELD, FieldInfo
from cvr_spark.data.jvm_parser import PARSERS
from cvr_spark.tables import FORMATS, even_files, join, local_path, table_version, write_json_atomic, write_table

LABELS = ("click", "conversion", "ctcvr", "ctnocvr")
SPLITS = ("train", "valid", "test")
INPUT_SPLIT = "input_split"
ROW_ID = "_row"
# The random split hashes this column when the source provides it (cvr_spark.data.sources: the raw
# id, or for sources without ids a hash of the file name and the line), else ``sample_id``.
SPLIT_KEY = "_split_key"
# ``split_column: source_file`` splits by input file, through the sources' file index column.
FILE_SPLIT, FILE_INDEX = "source_file", "_file_index"
# Sources whose fields come from ``FeaturesConfig.fields`` (aitm18 / full); CSV sources carry their own.
PRESET_SOURCES = ("aliccp-raw", "paddle-joined")
_BITS53 = (1 << 53) - 1
log = logging.getLogger(__name__)



class RejectBoundError(ValueError):
    """Too many input rows were rejected; raised before any table is published."""


class AccountingError(RuntimeError):
    """Input rows != feature rows + rejected rows; raised before any table is published."""


@dataclass
class FeaturesConfig:
    """The feature job: source -> canonical frame -> vocab + encoded features tables."""

    source: str = "aliccp-raw"
    input: str = ""
    output: str = ""
    fields: str = "aitm18"
    min_count: int = 10
    format: str = "delta"
    valid_fraction: float = 0.1
    # Split validation by a column (e.g. a time or file column) instead of a random fraction:
    # rows whose value is >= the (1 - valid_fraction) quantile go to valid.
    split_column: Optional[str] = None
    seed: int = 2020
    max_reject_fraction: float = 0.01
    rows_per_file: int = 1_000_000
    # Test input for sources whose test data is a separate file (empty: derived from input).
    test_input: str = ""
    # Vocabularies with at most this many kept ids are broadcast to the encoding joins.
    broadcast_max_ids: int = 1_000_000
    # percentile_approx accuracy of the split_column threshold (relative error 1/accuracy).
    quantile_accuracy: int = 10_000
    # Materialise the parsed input lines (or, for a source without them, the canonical frame)
    # with a local checkpoint (True) instead of persist (False). A checkpoint cuts the frame's
    # plan (the whole parse of the input) down to a scan of the stored rows, so the later
    # stages are analysed over short plans: about 8 s less driver time per job (7.5-9 s went
    # to analysing the 18 encoding joins over the parse); and it stores rows as they are,
    # where persist builds a compressed columnar cache (22 s of the 5M-row job's parse phase,
    # measured). The encoded features frame is not stored: the write computes it (see
    # _feature_table). A local checkpoint lives on the executors
    # and is not recomputed if one is lost (the job fails and can be re-run; the published
    # tables are untouched); set False on clusters that lose executors (spot, downscaling).
    truncate_lineage: bool = True
    # How raw Ali-CCP lines are parsed: "auto" (the JVM UDF where it can be compiled and
    # loaded, else SQL), "jvm" (an error where it cannot) or "sql" (cvr_spark.data.jvm_parser).
    parser: str = "auto"

    def check(self) -> None:
        """Raises: ValueError naming the first option out of range."""
        if not self.output:
            raise ValueError("features.output is empty: give the output folder")
        if self.format not in FORMATS:
            raise ValueError(f"features.format must be one of {FORMATS}, got {self.format!r}")
        if self.min_count < 1:
            raise ValueError(f"features.min_count must be >= 1, got {self.min_count}")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"features.valid_fraction must be in [0, 1), got {self.valid_fraction}")
        if not 0.0 <= self.max_reject_fraction <= 1.0:
            raise ValueError(f"features.max_reject_fraction must be in [0, 1], got {self.max_reject_fraction}")
        if self.rows_per_file < 1:
            raise ValueError(f"features.rows_per_file must be >= 1, got {self.rows_per_file}")
        if self.parser not in PARSERS:
            raise ValueError(f"features.parser must be one of {PARSERS}, got {self.parser!r}")


class SourceLike(Protocol):
    """The shape of ``cvr_spark.data.sources.SourceData`` that this job reads."""

    train: DataFrame
    valid: Optional[DataFrame]
    test: Optional[DataFrame]
    rejects: DataFrame  # source_file, line, reason, input_split
    fields: list[FieldInfo]
    dense_fields: list[str]
    source_files: dict[str, list[str]]
    # Optional: the frame the ones above derive from; stored first when present (with_parsed).
    parsed: Optional[DataFrame]

    def input_rows(self) -> dict[str, int]: ...

    def with_parsed(self, parsed: DataFrame) -> "SourceLike": ...


# ---------------------------------------------------------------- stages (pure DataFrame -> DataFrame)

def canonical_frame(data: SourceLike) -> DataFrame:
    """The train / valid / test inputs as one frame with ``input_split`` and a row id ``_row``."""
    parts = [getattr(data, s).withColumn(INPUT_SPLIT, F.lit(s))
             for s in SPLITS if getattr(data, s) is not None]
    out = reduce(lambda a, b: a.unionByName(b, allowMissingColumns=True), parts)
    return out.withColumn(ROW_ID, F.monotonically_increasing_id())


def check_fields(df: DataFrame, fields: Sequence[FieldInfo]) -> None:
    """Raises: KeyError / TypeError naming a field column that is missing or of the wrong type."""
    types = {f.name: f.dataType for f in df.schema.fields}
    for f in fields:
        if f.name not in types:
            raise KeyError(f"field column '{f.name}' missing from the canonical frame "
                           f"(columns: {sorted(types)})")
        t = types[f.name]
        ok = isinstance(t, ArrayType) if f.multi else isinstance(t, (StringType, NumericType))
        if not ok:
            want = "array<string>" if f.multi else "string"
            raise TypeError(f"field column '{f.name}' is {t.simpleString()}, expected {want}")


def _occurrences(df: DataFrame, fields: Sequence[FieldInfo]) -> DataFrame:
    """One row (``_fi``: the field's position in ``fields``, ``raw_id``) per non-null value
    occurrence (array elements counted each). The field is a position, not its name: the
    counting aggregation's keys are then an int and the id (the 2.25M train rows of the
    5M-row benchmark, three interleaved rounds: 5.5 / 5.5 / 7.0 s against 6.4 / 6.1 / 7.3 s)."""
    items = []
    for i, f in enumerate(fields):
        position = F.lit(i).alias("_fi")
        if f.multi:
            arr = F.coalesce(F.col(f.name), F.array().cast("array<string>"))
            items.append(F.transform(arr, lambda x: F.struct(position, x.cast("string").alias("raw_id"))))
        else:
            items.append(F.array(F.struct(position,
                                          F.col(f.name).cast("string").alias("raw_id"))))
    occ = df.select(F.explode(F.concat(*items)).alias("o")).select("o._fi", "o.raw_id")
    return occ.where(F.col("raw_id").isNotNull())


def build_vocab(df: DataFrame, fields: Sequence[FieldInfo], min_count: int) -> DataFrame:
    """Per-field vocabularies: ``field, raw_id, index, count``.

    Ids seen at least ``min_count`` times get indices 1..K ordered by descending count, then
    raw id; index 0 (rare, unseen, missing) is not stored.
    """
    check_fields(df, fields)
    counts = (_occurrences(df, fields).groupBy("_fi", "raw_id")
              .agg(F.count(F.lit(1)).alias("count")).where(F.col("count") >= min_count))
    names = F.array(*[F.lit(f.name) for f in fields])
    counts = counts.select(F.get(names, F.col("_fi")).alias("field"), "raw_id", "count")
    order = Window.partitionBy("field").orderBy(F.desc("count"), F.asc("raw_id"))
    return counts.select("field", "raw_id", F.row_number().over(order).cast("int").alias("index"),
                         F.col("count").cast("long"))


def vocab_sizes(vocab: DataFrame, fields: Sequence[FieldInfo]) -> dict[str, int]:
    """``K + 1`` per field (1 where no id was kept); one small aggregation."""
    kept = {r["field"]: int(r["k"]) for r in vocab.groupBy("field").agg(F.max("index").alias("k")).collect()}
    return {f.name: kept.get(f.name, 0) + 1 for f in fields}


def _quote(name: str) -> str:
    """``name`` as a column reference (backticks: field names such as ``109_14`` or ``a.b``)."""
    return "`" + name.replace("`", "``") + "`"


def _id_hash(raw_id: Column) -> Column:
    """The join key of a raw id: its xxhash64 (null for null)."""
    return F.when(raw_id.isNotNull(), F.xxhash64(raw_id))


def _encode_singles(df: DataFrame, vocab: DataFrame, names: list[str], broadcast: list[str]) -> DataFrame:
    """All single-valued fields by one left join each; ``broadcast`` names the fields whose
    vocabulary is hinted BROADCAST.

    DataFrame joins, not one SQL statement over ``df``: ``spark.sql`` re-analyses its frame
    arguments, and the re-analysed plan no longer matches a persisted ``df`` (the canonical
    frame), so the whole input would be re-read and re-parsed for the encoding.
    """
    columns, index = df.columns, {}
    for i, n in enumerate(names):
        v = vocab.where(F.col("field") == n).select(_id_hash(F.col("raw_id")).alias(f"_vh{i}"),
                                                     F.col("raw_id").alias(f"_vr{i}"),
                                                     F.col("index").alias(f"_vi{i}"))
        raw = F.col(_quote(n)).cast("string")
        same = F.coalesce(raw == F.col(f"_vr{i}"), F.lit(False))
        df = df.join(F.broadcast(v) if n in broadcast else v,
                     (_id_hash(raw) == F.col(f"_vh{i}")) & same, "left")
        index[n] = F.coalesce(F.col(f"_vi{i}"), F.lit(0)).cast("int").alias(n)
    return df.select(*[index.get(c, F.col(_quote(c))) for c in columns])


def _encode_multi(df: DataFrame, vocab: DataFrame, names: list[str], broadcast: bool) -> DataFrame:
    """Explode all multi-valued fields once, join the vocab, regroup by ``_row``, join back."""
    empty = F.array().cast("array<string>")
    items = F.concat(*[F.transform(F.coalesce(F.col(n), empty), lambda x, i: F.struct(
        F.lit(n).alias("field"), i.alias("pos"), x.cast("string").alias("raw_id"))) for n in names])
    ex = df.select(ROW_ID, F.explode(items).alias("o")).select(ROW_ID, "o.*")  # [sum of lengths]
    v = vocab.where(F.col("field").isin(names)).select(
        F.col("field").alias("_vf"), F.col("raw_id").alias("_vr"), F.col("index").alias("_vi"))
    v = F.broadcast(v) if broadcast else v
    ex = ex.join(v, (F.col("field") == F.col("_vf")) & (F.col("raw_id") == F.col("_vr")), "left")
    item = F.struct("field", "pos", F.coalesce(F.col("_vi"), F.lit(0)).cast("int").alias("idx"))
    grouped = ex.groupBy(ROW_ID).agg(F.collect_list(item).alias("_items"))
    arrays = [F.transform(F.array_sort(F.filter("_items", lambda s: s["field"] == F.lit(n))),
                          lambda s: s["idx"]).alias(f"_vm{j}") for j, n in enumerate(names)]
    out = df.join(grouped.select(ROW_ID, *arrays), ROW_ID, "left")
    empty_int = F.array().cast("array<int>")
    out = out.withColumns({n: F.coalesce(F.col(f"_vm{j}"), empty_int) for j, n in enumerate(names)})
    return out.drop(*[f"_vm{j}" for j in range(len(names))])


def encode(df: DataFrame, vocab: DataFrame, fields: Sequence[FieldInfo],
           sizes: Optional[dict[str, int]] = None, broadcast_max_ids: int = 1_000_000) -> DataFrame:
    """Replace every field's raw ids by vocabulary indices (int; array<int> for multi fields).

    Joins only: a left join per single-valued field, hinted broadcast where its vocabulary is
    known (``sizes``) to be at most ``broadcast_max_ids`` ids (else Spark picks), and one
    explode / join / regroup for all multi-valued fields (needs the ``_row`` id).
    """
    check_fields(df, fields)
    small = (lambda names: sizes is not None and sum(sizes[n] for n in names) <= broadcast_max_ids)
    single = [f.name for f in fields if not f.multi]
    if single:
        df = _encode_singles(df, vocab, single, [n for n in single if small([n])])
    multi = [f.name for f in fields if f.multi]
    if multi:
        if ROW_ID not in df.columns:
            raise KeyError(f"encoding multi-valued fields {multi} needs the '{ROW_ID}' column "
                           "(see canonical_frame)")
        df = _encode_multi(df, vocab, multi, small(multi))
    return df


def add_labels(df: DataFrame) -> DataFrame:
    """``click``, ``conversion`` as int plus ``ctcvr = click*conversion``, ``ctnocvr = click*(1-conversion)``."""
    click, conv = F.col("click").cast("int"), F.col("conversion").cast("int")
    return df.withColumns({"click": click, "conversion": conv, "ctcvr": click * conv,
                           "ctnocvr": click * (F.lit(1) - conv)})


def add_keys(df: DataFrame, user_field: Optional[str] = USER_KEY_FIELD,
             item_field: Optional[str] = ITEM_KEY_FIELD) -> DataFrame:
    """``user_key`` / ``item_key``: xxhash64 of the raw key value (null if missing or no such field)."""
    def key(name: Optional[str]) -> Column:
        if not name or name not in df.columns:
            return F.lit(None).cast("long")
        return F.when(F.col(name).isNotNull(), F.xxhash64(F.col(name).cast("string")))
    return df.withColumns({"user_key": key(user_field), "item_key": key(item_field)})


def unit_hash(seed: int, column: str = "sample_id") -> Column:
    """A deterministic uniform [0, 1) value per ``column`` value and seed (53 bits of xxhash64)."""
    h = F.xxhash64(F.col(column), F.lit(int(seed))).bitwiseAND(F.lit(_BITS53))
    return h.cast("double") / F.lit(float(1 << 53))


def file_threshold(df: DataFrame, valid_fraction: float) -> int:
    """The split by input file: the first file index (name order, see ``sources.FILE_INDEX``)
    from which the last files of the train input hold at least ``valid_fraction`` of its rows;
    never the first file, so that train keeps at least one file. One small aggregation.

    Raises:
        KeyError: the frame has no file index. ValueError: the train input is a single file.
    """
    if FILE_INDEX not in df.columns:
        raise KeyError(f"split_column '{FILE_SPLIT}': the source gives no input file index (columns: {df.columns})")
    rows = {int(r[FILE_INDEX]): int(r["count"]) for r in df.groupBy(FILE_INDEX).count().collect()}
    if len(rows) < 2:
        raise ValueError(f"split_column '{FILE_SPLIT}' needs a train input of at least 2 files with rows "
                         f"(found {len(rows)}); use the random split (no split_column) instead")
    order = sorted(rows)
    total, tail, cut = sum(rows.values()), 0, order[-1]
    for index in reversed(order[1:]):
        tail, cut = tail + rows[index], index
        if tail >= valid_fraction * total:
            break
    return cut


def split_threshold(df: DataFrame, column: str, valid_fraction: float, accuracy: int = 10_000) -> Any:
    """The (1 - valid_fraction) quantile of ``column`` (numeric, date or timestamp); for
    ``source_file``, :func:`file_threshold`.

    Raises:
        KeyError: no such column. TypeError: the column is not orderable as a number or time.
    """
    if column == FILE_SPLIT:
        return file_threshold(df, valid_fraction)
    if column not in df.columns:
        raise KeyError(f"split_column '{column}' not in the input (columns: {df.columns})")
    kind = df.schema[column].dataType.simpleString()
    if not (isinstance(df.schema[column].dataType, NumericType) or kind in ("date", "timestamp", "timestamp_ntz")):
        raise TypeError(f"split_column '{column}' is {kind}, expected a numeric, date or timestamp column")
    q = F.percentile_approx(F.col(column), F.lit(1.0 - valid_fraction), F.lit(int(accuracy)))
    return df.agg(q.alias("q")).first()["q"]


def assign_split(df: DataFrame, valid_fraction: float, seed: int, split_column: Optional[str] = None,
                 threshold: Any = None) -> DataFrame:
    """Add ``split``: train-input rows -> train/valid, valid input -> valid, test input -> test.

    Args:
        valid_fraction: share of the train input carved out as valid (0: none).
        seed: seed of the random (hash of ``sample_id``) split.
        split_column: split by this column instead: values >= ``threshold`` are valid.
        threshold: the cut; computed with :func:`split_threshold` on the train input if None.
    """
    src = F.col(INPUT_SPLIT)
    if valid_fraction <= 0:
        to_valid = F.lit(False)
    elif split_column:
        if threshold is None:
            threshold = split_threshold(df.where(src == "train"), split_column, valid_fraction)
        column = FILE_INDEX if split_column == FILE_SPLIT else split_column
        to_valid = F.coalesce(F.col(column) >= F.lit(threshold), F.lit(False))
    else:
        to_valid = unit_hash(seed, SPLIT_KEY if SPLIT_KEY in df.columns else "sample_id") < F.lit(float(valid_fraction))
    split = F.when(src == "train", F.when(to_valid, F.lit("valid")).otherwise(F.lit("train"))).otherwise(src)
    return df.withColumn("split", split)


def feature_frame(df: DataFrame, fields: Sequence[FieldInfo], dense_fields: Sequence[str]) -> DataFrame:
    """The features contract: sample_id, int32 per field (array<int32>), float32 dense, int labels,
    user_key, item_key, split (plus ``input_split`` kept for accounting; dropped when written)."""
    cols = [F.col("sample_id").cast("long")]
    cols += [F.col(f.name).cast("array<int>" if f.multi else "int") for f in fields]
    cols += [F.col(d).cast("float") for d in dense_fields]
    cols += [F.col(c).cast("int") for c in LABELS]
    cols += [F.col("user_key").cast("long"), F.col("item_key").cast("long"), "split", INPUT_SPLIT]
    return df.select(*cols)


# ---------------------------------------------------------------- checks and statistics

def check_reject_bound(rows_in: dict[str, int], rejects_by_reason: dict[str, int], bound: float) -> None:
    """Raises: RejectBoundError when rejected / input rows > ``bound`` (names counts per reason)."""
    total, n = sum(rows_in.values()), sum(rejects_by_reason.values())
    if total <= 0:
        raise ValueError(f"the source read no input rows (rows per input split: {rows_in})")
    if n / total > bound:
        raise RejectBoundError(
            f"{n} of {total} input rows rejected ({n / total:.4%}) exceeds max_reject_fraction={bound}; "
            f"rejects by reason: {dict(sorted(rejects_by_reason.items()))}; no table was written")


def split_stats(table: DataFrame) -> dict[tuple[str, str], dict[str, int]]:
    """Rows, label sums and label-contract violations per (input_split, split): one aggregation."""
    click, conv = F.col("click"), F.col("conversion")
    bad = F.coalesce(~click.isin(0, 1) | ~conv.isin(0, 1) | (conv > click), F.lit(True))
    aggs = [F.count(F.lit(1)).alias("rows"), *[F.sum(c).alias(c) for c in LABELS],
            F.sum(bad.cast("int")).alias("bad")]
    out = {}
    for r in table.groupBy(INPUT_SPLIT, "split").agg(*aggs).collect():
        out[(r[INPUT_SPLIT], r["split"])] = {k: int(r[k] or 0) for k in ("rows", *LABELS, "bad")}
    for (src, _), s in out.items():
        if s["bad"]:
            raise ValueError(f"{s['bad']} rows of input split '{src}' break the label contract "
                             "(click and conversion in {0, 1}, conversion <= click): the source "
                             "reader must reject them")
    return out


def check_accounting(rows_in: dict[str, int], features_by_input: dict[str, int],
                     rejects_by_input: dict[str, int]) -> dict[str, dict[str, int]]:
    """Per input split: rows_in == feature rows + rejected rows.

    Raises:
        AccountingError: naming every input split where the equation fails.
    """
    names = sorted(set(rows_in) | set(features_by_input) | set(rejects_by_input))
    table = {s: {"rows_in": int(rows_in.get(s, 0)), "features": int(features_by_input.get(s, 0)),
                 "rejects": int(rejects_by_input.get(s, 0))} for s in names}
    bad = {s: t for s, t in table.items() if t["rows_in"] != t["features"] + t["rejects"]}
    if bad:
        raise AccountingError(f"row accounting failed (rows_in != features + rejects): {bad}; "
                              "no table was written")
    return table


def _sum_by(counts: dict[tuple[str, str], int], pos: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, n in counts.items():
        out[key[pos]] = out.get(key[pos], 0) + n
    return out


# ---------------------------------------------------------------- publishing

def publish_tables(cfg: FeaturesConfig, table: DataFrame, vocab: DataFrame, rejects: DataFrame,
                   rows_per_split: dict[str, int], vocab_rows: int, reject_rows: int) -> dict[str, dict]:
    """Write features (partitioned by split), vocab and rejects; return {name: {path, format, version}}."""
    out = cfg.output  # text, not Path: keeps the // of s3://, hdfs://, file:// outputs
    files = (lambda n: max(1, math.ceil(n / cfg.rows_per_file)))
    laid = even_files(table.drop(INPUT_SPLIT), "split", rows_per_split, cfg.rows_per_file, "sample_id", cfg.seed)
    # No per-file min/max statistics on the features table (numRecords stays): its files are
    # random groups of rows, so every file spans every column's range and no query could skip
    # one, and collecting them cost about a fifth of the write (4M rows x 25 columns: 7.7 s
    # against 6.2 s on the 2-core VM, a one-off measurement).
    versions = {"features": write_table(laid, join(out, "features"), cfg.format, partition_by=["split"],
                                        delta_properties={"delta.dataSkippingNumIndexedCols": "0"})}
    versions["vocab"] = write_table(vocab, join(out, "vocab"), cfg.format, num_files=files(vocab_rows))
    rej = rejects.select(F.col("source_file").cast("string"), F.col("line").cast("string"),
                         F.col("reason").cast("string"), F.col(INPUT_SPLIT).cast("string"))
    versions["rejects"] = write_table(rej, join(out, "rejects"), cfg.format, num_files=files(reject_rows))
    return {name: {"path": name, "format": cfg.format, "version": v} for name, v in versions.items()}


def simulator_truth(spark: Any, cfg: FeaturesConfig) -> Optional[dict]:
    """The simulator's truth table beside a raw Ali-CCP input (``<input>/truth``, written by
    ``cvr-spark simulate``) as a manifest table entry (absolute path, format, current version),
    so that evaluation reports the ground-truth metrics; None for other sources, when there is
    none, or when the test pair comes from another folder (its ids are not in that truth)."""
    if cfg.source != "aliccp-raw" or (cfg.test_input and cfg.test_input.rstrip("/") != cfg.input.rstrip("/")):
        return None
    local = local_path(cfg.input)
    path = join(str(Path(local).resolve()) if local is not None else cfg.input, "truth")
    for fmt in FORMATS:
        version = table_version(spark, path, fmt)
        if version is not None:
            return {"path": path, "format": fmt, "version": version}
    return None


def build_manifest(cfg: FeaturesConfig, data: SourceLike, sizes: dict[str, int],
                   stats: dict[tuple[str, str], dict[str, int]], facts: dict[str, Any]) -> dict:
    """The manifest (contract of FeatureSpec.from_manifest and the trainer)."""
    names = [f.name for f in data.fields]
    rows, rates = {}, {}
    for split in SPLITS:
        parts = [s for (_, sp), s in stats.items() if sp == split]
        n = sum(p["rows"] for p in parts)
        if n:
            rows[split] = n
            rates[split] = {c: sum(p[c] for p in parts) / n for c in LABELS}
    return {
        "fields": [{"name": f.name, "group": f.group, "multi": bool(f.multi), "vocab_size": sizes[f.name]}
                   for f in data.fields],
        "dense_fields": list(data.dense_fields),
        "user_key_field": USER_KEY_FIELD if USER_KEY_FIELD in names else None,
        "item_key_field": ITEM_KEY_FIELD if ITEM_KEY_FIELD in names else None,
        # the preset that chose the fields; None where the source brings its own (CSV sources)
        "fields_preset": cfg.fields if cfg.source in PRESET_SOURCES else None,
        "labels": list(LABELS), "rows": rows, "label_rates": rates, **facts,
        "config": dataclasses.asdict(cfg), "source": cfg.source,
        # the parser that ran, where the source has a choice (raw Ali-CCP: "jvm" or "sql")
        "parser": getattr(data, "parser", None),
        "source_files": {k: list(v) for k, v in (data.source_files or {}).items()},
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------- the job

def _persist(df: DataFrame, held: list[DataFrame], checkpoint: bool = False) -> DataFrame:
    """``df`` materialised once and recorded in ``held`` for :func:`_release`: persisted, or
    with ``checkpoint`` computed now into a local checkpoint whose plan is a scan of the stored
    rows (see ``FeaturesConfig.truncate_lineage``).

    Stored deserialized in memory (``MEMORY_AND_DISK_DESER``; partitions that do not fit go to
    disk). PySpark's ``MEMORY_AND_DISK`` is the JVM's serialized level, under which every row
    of the checkpoint went through the serializer when stored and again in each of the four
    later scans: the 5M-row job took 77.3 / 73.8 s cold and 62.1 / 64.0 s warm with it, 70.0 /
    72.7 s and 56.0 / 57.3 s with the rows kept as they are (interleaved, two rounds)."""
    if checkpoint:
        df = df.localCheckpoint(eager=True, storageLevel=StorageLevel.MEMORY_AND_DISK_DESER)
    else:
        df = df.persist(StorageLevel.MEMORY_AND_DISK_DESER)
    held.append(df)
    return df


def _release(df: DataFrame) -> None:
    """Free what :func:`_persist` stored for ``df``: unpersist, and for a local checkpoint the
    blocks of its checkpointed RDD (through the JVM plan, where there is one: without it, as
    under Spark Connect, Spark's cleaner frees them once the frame is garbage collected)."""
    df.unpersist()
    try:
        plan = df._jdf.queryExecution().analyzed()
        if plan.nodeName() == "LogicalRDD":
            plan.rdd().unpersist(False)
    except Exception:  # noqa: BLE001 - best effort: no JVM handle (Spark Connect) or another plan
        pass


def stored_sizes(df: DataFrame) -> Optional[tuple[int, int]]:
    """(bytes in memory, bytes on disk) of a local checkpoint's stored rows (:func:`_persist`
    with ``checkpoint``), from Spark's storage status; None where they cannot be read (a
    persisted frame, no JVM handle as under Spark Connect, or nothing stored)."""
    try:
        plan = df._jdf.queryExecution().analyzed()
        if plan.nodeName() != "LogicalRDD":
            return None
        rdd_id = plan.rdd().id()
        for info in df.sparkSession.sparkContext._jsc.sc().getRDDStorageInfo():
            if info.id() == rdd_id:
                return int(info.memSize()), int(info.diskSize())
    except Exception:  # noqa: BLE001 - a report only: no JVM handle (Spark Connect) or another plan
        return None
    return None


def warn_if_on_disk(df: DataFrame, what: str) -> Optional[tuple[int, int]]:
    """Log a warning when part of ``df``'s stored rows went to disk (see :func:`stored_sizes`).

    Partitions that do not fit in Spark's storage memory are written to disk, serialized, and
    every later pass over the rows reads them back (Spark also tries each time to put them
    back in memory): with a 6g driver the warm 10M-row run was 7-24 % slower per row than
    the 5M-row one, whose rows fitted (README, "Feature job"). Returns the sizes."""
    sizes = stored_sizes(df)
    if sizes is not None and sizes[1] > 0:
        log.warning("%s: %d MB of the stored rows are in memory and %d MB went to disk (they did "
                    "not fit in Spark's storage memory); every later pass re-reads them, which is "
                    "slower: give the driver (local mode: spark.driver_memory) or the executors more "
                    "memory", what, sizes[0] >> 20, sizes[1] >> 20)
    return sizes


def _store_parsed(cfg: FeaturesConfig, data: SourceLike, held: list[DataFrame]) -> SourceLike:
    """The source with its parsed lines stored once (:func:`_persist`) and every frame derived
    from the stored rows: the input is parsed once for the rejects, the canonical frames and
    the counts. A line's raw text and its file's path are kept only where the row is rejected
    (the rejects table needs them; the accepted rows do not, their file is ``_file_index``),
    which spares storing the input's text a second time and a path per row."""
    parsed = getattr(data, "parsed", None)
    if parsed is None:
        return data
    rejected = F.col("_reason").isNotNull()
    slim = parsed.withColumns({c: F.when(rejected, F.col(c)) for c in ("_line", "_source_file")})
    stored = _persist(slim, held, cfg.truncate_lineage)
    warn_if_on_disk(stored, f"the parsed lines of {cfg.source} '{cfg.input}'")
    return data.with_parsed(stored)


def _feature_table(cfg: FeaturesConfig, data: SourceLike, held: list[DataFrame]) -> tuple:
    """Canonical frame -> vocab (persisted) -> the features frame (lazy: the write computes it).

    The canonical frame is read three times (vocabularies, the split statistics, the encoding
    in the write). Where the source's parsed lines are stored (:func:`_store_parsed`) it is a
    filter of them and is not stored again (a second copy of every row cost more than the
    scans); else it is materialised once. The statistics (rows and label sums per split, from
    which the accounting is checked before anything is written) are counted on the canonical
    rows with their split, not on the encoded frame: the encoding's left joins keep every row
    (a vocabulary holds an id once), so the written table has exactly these rows, and the
    encoded frame need not be stored before the write (about 1 GB of rows at 5M rows).
    Returns (features frame, vocab, vocab sizes, split info, split statistics)."""
    names = [f.name for f in data.fields]
    keys = [k if k in names else None for k in (USER_KEY_FIELD, ITEM_KEY_FIELD)]
    parsed = getattr(data, "parsed", None)
    canonical = add_keys(canonical_frame(data), *keys)
    if parsed is None:
        canonical = _persist(canonical, held, cfg.truncate_lineage)
    check_fields(canonical, data.fields)
    train_in = canonical.where(F.col(INPUT_SPLIT) == "train")
    vocab = _persist(build_vocab(train_in, data.fields, cfg.min_count), held)
    sizes = vocab_sizes(vocab, data.fields)  # materialises the vocab
    frac = 0.0 if data.valid is not None else cfg.valid_fraction
    threshold = None
    if cfg.split_column and frac > 0:
        threshold = split_threshold(train_in, cfg.split_column, frac, cfg.quantile_accuracy)
    # The split is assigned on the raw values (the threshold was taken on them), then encoded.
    split = assign_split(add_labels(canonical), frac, cfg.seed, cfg.split_column, threshold)
    stats = split_stats(split)
    encoded = encode(split, vocab, data.fields, sizes, cfg.broadcast_max_ids)
    table = feature_frame(encoded, data.fields, data.dense_fields)
    mode = "source" if data.valid is not None else "column" if cfg.split_column else "random"
    split_info = {"mode": mode, "valid_fraction": frac, "seed": cfg.seed,
                  "split_column": cfg.split_column, "threshold": threshold}
    return table, vocab, sizes, split_info, stats


def build_features(cfg: FeaturesConfig, data: SourceLike) -> dict:
    """The feature job on an already-read source (see :func:`run_features`); returns the manifest."""
    cfg.check()
    held: list[DataFrame] = []
    try:
        data = _store_parsed(cfg, data, held)
        rejects = _persist(data.rejects, held)
        reject_counts = {(r[INPUT_SPLIT], r["reason"]): int(r["count"])
                         for r in rejects.groupBy(INPUT_SPLIT, "reason").count().collect()}
        rows_in = {str(k): int(v) for k, v in data.input_rows().items()}
        check_reject_bound(rows_in, _sum_by(reject_counts, 1), cfg.max_reject_fraction)
        table, vocab, sizes, split_info, stats = _feature_table(cfg, data, held)
        if not any(src == "train" for src, _ in stats):
            raise ValueError(f"the train input of {cfg.source} '{cfg.input}' has no valid rows")
        by_input = _sum_by({k: s["rows"] for k, s in stats.items()}, 0)
        accounting = check_accounting(rows_in, by_input, _sum_by(reject_counts, 0))
        rows_per_split = _sum_by({k: s["rows"] for k, s in stats.items()}, 1)
        tables = publish_tables(cfg, table, vocab, rejects, rows_per_split,
                                sum(sizes.values()) - len(sizes), sum(reject_counts.values()))
        truth = simulator_truth(table.sparkSession, cfg)
        if truth is not None:
            tables["truth"] = truth
        facts = {"rows_in": rows_in, "rejects": _sum_by(reject_counts, 1), "accounting": accounting,
                 "split": split_info, "tables": tables}
        manifest = build_manifest(cfg, data, sizes, stats, facts)
        write_json_atomic(join(cfg.output, "manifest.json"), manifest, table.sparkSession)
        return manifest
    finally:
        for df in held:
            _release(df)


def run_features(spark: Any, cfg: FeaturesConfig) -> dict:
    """Read ``cfg.source`` from ``cfg.input`` and build + publish the feature tables.

    Returns:
        The manifest (also written to ``<cfg.output>/manifest.json``, last, atomically).

    Raises:
        ValueError: a bad option or input. RejectBoundError: too many rejected rows.
        AccountingError: rows lost or duplicated. All are raised before any table is written.
    """
    cfg.check()
    from cvr_spark.data.sources import read_source

    data = read_source(spark, cfg.source, cfg.input, fields=cfg.fields, test_input=cfg.test_input,
                       parser=cfg.parser)
    return build_features(cfg, data)
