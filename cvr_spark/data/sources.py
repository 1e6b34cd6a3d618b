"""Source readers: every supported input -> the canonical Spark DataFrame + a rejects DataFrame.

Canonical columns (DESIGN.md "Data contracts"): ``sample_id`` (long), ``click`` and
``conversion`` (int 0/1), one column per field named as the field (string raw id, null when
missing; ``array<string>`` for multi-valued fields, empty when missing), dense columns as double.

Every line is read as text (so a rejected row keeps its raw line) and parsed with Spark SQL
functions only (no Python UDFs, nothing collected but one header line per file). For each
input split, ``input_rows == canonical rows + rejected rows``.

Decisions where the spec is silent:

* ``sample_id``: raw Ali-CCP keeps its raw id, shifted per split so train and test (whose raw
  ids overlap in the real release) stay unique: ``raw + SAMPLE_ID_OFFSET[split]`` (train 0,
  valid 2**56, test 2**57); raw ids must lie in [0, 2**56), and every copy of an id that
  appears twice in one split is rejected (``duplicate_sample_id``). The other sources get
  generated ids (``monotonically_increasing_id`` + the split offset; deterministic for the
  same files): PaddleRec part files may restart their ids, AliExpress' ``search_id`` is not
  unique, and the CSVs have none.
* Headers: a file's first line is a header when its first token is not a number. Header
  columns are matched by name, so any column order works; a headerless file takes the
  column order of the first header found (train, valid, test), else the format's default.
* ``fields`` (the preset) applies to ``aliccp-raw`` and ``paddle-joined``; the CSV sources
  carry their own fields (AITM: every non-label header column; rechub: its 23 sparse
  columns, all single-valued ids; AliExpress: ``categorical_1..16``, group ``context``
  since the release does not say which are user or item fields).
* Empty values are null; in AITM CSVs ``"0"`` is also null (the AITM script writes missing
  as '0'); in rechub and AliExpress CSVs ``"0"`` is a real encoded id. Dense values must
  parse as finite numbers (else ``bad_dense_value``).
* Reasons are checked in a fixed order and a row gets the first one that fails (structure,
  labels, ids, features, join, then ``conversion_without_click``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import reduce
from typing import Any, Optional

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from cvr_spark.data import aliccp_raw
from cvr_spark.data.fields import AITM18, FULL, FieldInfo, aliccp_fields, group_of

SOURCES = ("aliccp-raw", "aitm-csv", "rechub-csv", "paddle-joined", "aliexpress-csv")
REJECT_REASONS = (
    "bad_column_count", "bad_label", "bad_sample_id", "duplicate_sample_id",
    "malformed_feature", "feature_count_mismatch", "missing_common_key",
    "duplicate_common_key", "malformed_common_feature", "bad_dense_value",
    "conversion_without_click",
)
SPLITS = ("train", "valid", "test")
SAMPLE_ID_BITS = 56
SAMPLE_ID_OFFSET = {split: i << SAMPLE_ID_BITS for i, split in enumerate(SPLITS)}
REJECT_COLUMNS = ("source_file", "line", "reason", "input_split")


@dataclass
class SourceData:
    """What a reader returns: canonical frames per input split, rejects and the schema."""

    train: DataFrame
    valid: Optional[DataFrame]
    test: Optional[DataFrame]
    rejects: DataFrame
    fields: list[FieldInfo]
    dense_fields: list[str]
    source_files: dict[str, list[str]]
    data_lines: Optional[DataFrame] = field(default=None, repr=False)  # one row per data line
    # The parsed lines of every split (one row per data line, with ``input_split``): the
    # frames above all derive from it, so persisting it parses the input once, not once per
    # frame (and per self-join) that reads it.
    parsed: Optional[DataFrame] = field(default=None, repr=False)

    def input_rows(self) -> dict[str, int]:
        """Data lines read per input split (headers excluded), counted on the raw lines."""
        counts = {split: 0 for split in self.source_files}
        if self.data_lines is not None:
            for row in self.data_lines.groupBy("input_split").count().collect():
                counts[row["input_split"]] = row["count"]
        return counts


@dataclass(frozen=True)
class _CsvFormat:
    """A CSV layout: label columns, default column order, fields and dense columns."""

    click: str
    conversion: str
    default_columns: tuple[str, ...]
    fields: Optional[tuple[str, ...]]  # None: every non-label column is a field
    dense: tuple[str, ...] = ()
    zero_is_missing: bool = False
    group: Optional[str] = None  # group of every field; None: Ali-CCP's catalogue (group_of)


_RECHUB_SPARSE = tuple(f for f in FULL if f not in ("109_14", "110_14", "127_14", "150_14")) + (
    "109_14", "110_14", "127_14", "150_14")
_RECHUB_DENSE = ("D109_14", "D110_14", "D127_14", "D150_14", "D508", "D509", "D702", "D853")
_AE_CAT = tuple(f"categorical_{i}" for i in range(1, 17))
_AE_NUM = tuple(f"numerical_{i}" for i in range(1, 64))
CSV_FORMATS = {
    "aitm-csv": _CsvFormat("click", "purchase", ("click", "purchase", *AITM18), None,
                           zero_is_missing=True),
    "rechub-csv": _CsvFormat("click", "purchase", ("click", "purchase", *_RECHUB_SPARSE,
                                                   *_RECHUB_DENSE), _RECHUB_SPARSE, _RECHUB_DENSE),
    "aliexpress-csv": _CsvFormat("click", "conversion",
                                 ("search_id", *_AE_CAT, *_AE_NUM, "click", "conversion"),
                                 _AE_CAT, _AE_NUM, group="context"),
}
# File-name patterns of each split inside an input folder.
SPLIT_PATTERNS = {
    "aitm-csv": {"train": r"train\.csv", "test": r"test\.csv"},
    "rechub-csv": {"train": r"ali_ccp_train.*\.csv", "valid": r"ali_ccp_val.*\.csv",
                   "test": r"ali_ccp_test.*\.csv"},
    "paddle-joined": {"train": r"train.*", "test": r"test.*"},
    "aliexpress-csv": {"train": r".*train.*\.csv", "test": r".*test.*\.csv"},
}
# A raw common-features file up to this size is joined by broadcast (its parsed, per-key
# table is a fraction of the text: only the preset's fields are kept), which spares the
# shuffle of every skeleton row; a larger one is left to Spark (sort-merge join or AQE).
BROADCAST_COMMON_MAX_BYTES = 256 * 2**20
RAW_FILES = {split: (f"sample_skeleton_{split}.csv", f"common_features_{split}.csv")
             for split in ("train", "test")}


def read_source(spark: SparkSession, source: str, input: str, fields: str = "aitm18",
                test_input: str = "") -> SourceData:
    """Read one supported input into canonical frames and rejects.

    Args:
        source: one of :data:`SOURCES`.
        input: a file (the train input) or a folder holding the split files.
        fields: field preset (``aitm18`` / ``full``) for ``aliccp-raw`` and ``paddle-joined``.
        test_input: explicit test file (for ``aliccp-raw``: a folder holding the test pair).

    Raises:
        ValueError: unknown source or preset; a header without a required column.
        FileNotFoundError: a missing input file or folder, or a folder without a train file.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown source '{source}', expected one of {list(SOURCES)}")
    if source == "aliccp-raw":
        return _read_aliccp_raw(spark, input, aliccp_fields(fields), test_input)
    files = _resolve_files(spark, source, input, test_input)
    if source == "paddle-joined":
        infos = aliccp_fields(fields)
        parsed = {s: [aliccp_raw.read_joined(spark, p, infos) for p in paths]
                  for s, paths in files.items()}
        lines = {s: [spark.read.text(p) for p in paths] for s, paths in files.items()}
        return _assemble(parsed, lines, files, infos, [], raw_ids=False)
    return _read_csv(spark, CSV_FORMATS[source], files)


# ---------------------------------------------------------------- files


def _hadoop_fs(spark: SparkSession, path: str) -> tuple[Any, Any]:
    """(Hadoop FileSystem, Path) of ``path``: works for local, HDFS, S3, DBFS paths."""
    jpath = spark._jvm.org.apache.hadoop.fs.Path(path)
    return jpath.getFileSystem(spark._jsc.hadoopConfiguration()), jpath


def _exists(spark: SparkSession, path: str) -> bool:
    fs, jpath = _hadoop_fs(spark, path)
    return bool(fs.exists(jpath))


def _is_dir(spark: SparkSession, path: str) -> bool:
    fs, jpath = _hadoop_fs(spark, path)
    return bool(fs.exists(jpath) and fs.getFileStatus(jpath).isDirectory())


def _size(spark: SparkSession, path: str) -> int:
    """Bytes of a file (of every file below it for a folder)."""
    fs, jpath = _hadoop_fs(spark, path)
    return int(fs.getContentSummary(jpath).getLength())


def _list_files(spark: SparkSession, folder: str) -> list[str]:
    """Sorted names of the plain files in ``folder`` (hidden ``.``/``_`` files skipped)."""
    fs, jpath = _hadoop_fs(spark, folder)
    names = [s.getPath().getName() for s in fs.listStatus(jpath) if s.isFile()]
    return sorted(n for n in names if not n.startswith((".", "_")))


def _require(spark: SparkSession, path: str, what: str) -> None:
    if not _exists(spark, path):
        raise FileNotFoundError(f"{what} '{path}' does not exist")


def _resolve_files(spark: SparkSession, source: str, input: str,
                   test_input: str) -> dict[str, list[str]]:
    """input split -> files, from a file (train) or a folder (names per SPLIT_PATTERNS)."""
    _require(spark, input, f"{source} input")
    if not _is_dir(spark, input):
        files = {"train": [input]}
    else:
        names = _list_files(spark, input)
        files = {}
        for split, pattern in SPLIT_PATTERNS[source].items():
            hits = [f"{input.rstrip('/')}/{n}" for n in names if re.fullmatch(pattern, n)]
            if hits:
                files[split] = hits
        if "train" not in files:
            raise FileNotFoundError(
                f"{source}: no train file in folder '{input}' (expected a file name matching "
                f"'{SPLIT_PATTERNS[source]['train']}', found {names})")
    if test_input:
        _require(spark, test_input, f"{source} test input")
        files["test"] = [test_input]
    return files


# ---------------------------------------------------------------- assembly


def _generated_ids(df: DataFrame, split: str) -> DataFrame:
    """``sample_id`` of sources without usable ids: ``monotonically_increasing_id`` + the split
    offset, taken on the split's own frame (its partitions number the ids)."""
    offset = F.lit(SAMPLE_ID_OFFSET[split]).cast("long")
    return df.withColumn("sample_id", F.monotonically_increasing_id() + offset)


def _raw_sample_ids(df: DataFrame, split: str) -> DataFrame:
    """``sample_id`` of raw-id sources (the raw id + the split offset) and their id rejects.

    The duplicated ids are broadcast to the join: every row that carries one is rejected, so
    they are few in any input that passes the reject bound, and the rows are not shuffled.
    """
    offset = F.lit(SAMPLE_ID_OFFSET[split]).cast("long")
    dups = (df.filter(F.col("_raw_id").isNotNull()).groupBy("_raw_id").count()
            .filter(F.col("count") > 1).select("_raw_id", F.lit(True).alias("_dup")))
    df = df.join(F.broadcast(dups), on="_raw_id", how="left")
    reason = F.coalesce(F.col("_reason"), aliccp_raw.first_reason([
        (F.col("_raw_id") >= F.lit(1 << SAMPLE_ID_BITS), "bad_sample_id"),
        (F.col("_dup").isNotNull(), "duplicate_sample_id")]))
    return df.withColumn("_reason", reason).withColumn("sample_id", F.col("_raw_id") + offset)


def _canonical(df: DataFrame, fields: list[FieldInfo], dense: list[str]) -> DataFrame:
    return df.filter(F.col("_reason").isNull()).select(
        F.col("sample_id").cast("long"), F.col("click").cast("int"),
        F.col("conversion").cast("int"), *[F.col(f.name) for f in fields],
        *[F.col(d).cast("double") for d in dense])


def _assemble(parsed: dict[str, list[DataFrame]], lines: dict[str, list[DataFrame]],
              files: dict[str, list[str]], fields: list[FieldInfo], dense: list[str],
              raw_ids: bool) -> SourceData:
    """Per-split parsed frames (one row per data line) -> :class:`SourceData`.

    All splits meet in one frame (``SourceData.parsed``) that the canonical frames and the
    rejects are filtered from, so that one persisted frame serves them all.
    """
    splits = [s for s in SPLITS if s in parsed]
    per_split = {s: reduce(DataFrame.unionByName, parsed[s]) for s in splits}
    if not raw_ids:
        per_split = {s: _generated_ids(df, s) for s, df in per_split.items()}
    rows = reduce(DataFrame.unionByName, [df.withColumn("input_split", F.lit(s))
                                          for s, df in per_split.items()])
    frames, rejects = {}, []
    for split in splits:
        df = rows.filter(F.col("input_split") == split)
        if raw_ids:
            df = _raw_sample_ids(df, split)
        frames[split] = _canonical(df, fields, dense)
        rejects.append(df.filter(F.col("_reason").isNotNull()).select(
            F.col("_source_file").alias("source_file"), F.col("_line").alias("line"),
            F.col("_reason").alias("reason"), F.lit(split).alias("input_split")))
    counted = [d.select(F.lit(s).alias("input_split")) for s in splits for d in lines[s]]
    return SourceData(
        train=frames["train"], valid=frames.get("valid"), test=frames.get("test"),
        rejects=reduce(DataFrame.unionByName, rejects), fields=fields, dense_fields=dense,
        source_files={s: files[s] for s in SPLITS if s in files},
        data_lines=reduce(DataFrame.unionByName, counted), parsed=rows)


# ---------------------------------------------------------------- raw Ali-CCP


def _read_aliccp_raw(spark: SparkSession, input: str, fields: list[FieldInfo],
                     test_input: str) -> SourceData:
    """The raw release: a folder with the train pair and optionally the test pair."""
    _require(spark, input, "aliccp-raw input folder")
    if not _is_dir(spark, input):
        raise FileNotFoundError(f"aliccp-raw input '{input}' is not a folder (expected one "
                                f"holding {RAW_FILES['train'][0]} and {RAW_FILES['train'][1]})")
    folders = {"train": input, "test": test_input or input}
    files: dict[str, list[str]] = {}
    for split, folder in folders.items():
        skeleton, common = (f"{folder.rstrip('/')}/{n}" for n in RAW_FILES[split])
        if split == "train" or test_input or _exists(spark, skeleton):
            _require(spark, skeleton, "aliccp-raw skeleton file")
            _require(spark, common, f"aliccp-raw common-features file (for {skeleton})")
            files[split] = [skeleton, common]
    parsed = {s: [aliccp_raw.read_skeleton(
        spark, f[0], aliccp_raw.read_common(spark, f[1], fields), fields,
        broadcast_common=_size(spark, f[1]) <= BROADCAST_COMMON_MAX_BYTES)] for s, f in files.items()}
    lines = {s: [spark.read.text(f[0])] for s, f in files.items()}
    return _assemble(parsed, lines, files, fields, [], raw_ids=True)


# ---------------------------------------------------------------- CSV


def _first_line(spark: SparkSession, path: str) -> Optional[str]:
    """The first line of a file (None when it is empty): one line, not data, on the driver."""
    rows = spark.read.text(path).limit(1).collect()
    return rows[0]["value"] if rows else None


def _is_header(line: str) -> bool:
    """A first line is a header when its first token is not a number."""
    token = line.lstrip("\ufeff").split(",", 1)[0].strip()
    try:
        float(token)
    except ValueError:
        return True
    return False


def _columns(line: str) -> list[str]:
    return [c.strip() for c in line.lstrip("\ufeff").rstrip("\r").split(",")]


def _check_header(path: str, columns: list[str], required: list[str]) -> None:
    for col in required:
        if col not in columns:
            raise ValueError(f"'{path}': header has no column '{col}' (expected columns "
                             f"{required}; found {columns})")


def _layout(fmt: _CsvFormat, headers: dict[str, Optional[list[str]]]) -> list[str]:
    """Column order of headerless files: the first header found, else the default."""
    found = [cols for cols in headers.values() if cols is not None]
    return found[0] if found else list(fmt.default_columns)


def _read_csv(spark: SparkSession, fmt: _CsvFormat, files: dict[str, list[str]]) -> SourceData:
    """Read the CSV files of every split with ``fmt``."""
    first = {p: _first_line(spark, p) for s in SPLITS for p in files.get(s, [])}
    headers = {p: _columns(line) if line is not None and _is_header(line) else None
               for p, line in first.items()}
    layout = _layout(fmt, headers)
    labels = [fmt.click, fmt.conversion]
    names = [c for c in layout if c not in labels] if fmt.fields is None else list(fmt.fields)
    order = [c for c in layout if c in names]
    dense = [c for c in layout if c in fmt.dense]
    required = labels + (order if fmt.fields is None else list(fmt.fields)) + list(fmt.dense)
    for path, cols in headers.items():
        _check_header(path, cols if cols is not None else layout, required)
    fields = [FieldInfo(n, fmt.group or group_of(n)) for n in order]
    parsed, lines = {}, {}
    for split, paths in files.items():
        lines[split] = [_data_lines(spark, p, first[p] if headers[p] else None) for p in paths]
        parsed[split] = [_parse_csv(d, p, headers[p] or layout, fmt, order, dense)
                         for d, p in zip(lines[split], paths)]
    return _assemble(parsed, lines, files, fields, dense, raw_ids=False)


def _data_lines(spark: SparkSession, path: str, header: Optional[str]) -> DataFrame:
    df = spark.read.text(path)
    return df if header is None else df.filter(F.col("value") != F.lit(header))


def _parse_csv(lines: DataFrame, path: str, columns: list[str], fmt: _CsvFormat,
               fields: list[str], dense: list[str]) -> DataFrame:
    """Parsed rows of one CSV file whose columns are ``columns``."""
    split = aliccp_raw.barrier(lines.select(F.col("value").alias("_line"), F.split(
        F.regexp_replace(F.col("value"), "\r$", ""), ",", -1).alias("_parts")))

    def value(name: str) -> Column:
        return F.trim(F.get(F.col("_parts"), columns.index(name)))

    missing = ["", "0"] if fmt.zero_is_missing else [""]
    values = split.select(
        F.lit(path).alias("_source_file"), "_line", F.size("_parts").alias("_ncols"),
        value(fmt.click).alias("click"), value(fmt.conversion).alias("conversion"),
        *[F.when(~value(f).isin(*missing), value(f)).alias(f) for f in fields],
        *[value(d).try_cast("double").alias(d) for d in dense])
    bad_dense = F.exists(F.array(*dense), lambda x: F.isnull(x) | F.isnan(x) | (
        F.abs(x) == float("inf"))) if dense else F.lit(False)
    bad_label, no_click = aliccp_raw.label_checks(F.col("click"), F.col("conversion"))
    reason = aliccp_raw.first_reason([
        (F.col("_ncols") != len(columns), "bad_column_count"),
        (bad_label, "bad_label"),
        (bad_dense, "bad_dense_value"),
        (no_click, "conversion_without_click"),
    ])
    return aliccp_raw.barrier(values.withColumn("_reason", reason))
