"""Source readers: every supported input -> the canonical Spark DataFrame + a rejects DataFrame.

Canonical columns (DESIGN.md "Data contracts"): ``sample_id`` (long), ``click`` and
``conversion`` (int 0/1), one column per field named as the field (string raw id, null when
missing; ``array<string>`` for multi-valued fields, empty when missing), dense columns as double,
and ``_split_key`` (long): what the validation split hashes (see below).

Every line is read as text (so a rejected row keeps its raw line) and parsed in the JVM: with
Spark SQL functions, or for raw Ali-CCP with a Java UDF (``parser``, see
:mod:`cvr_spark.data.jvm_parser`); no Python UDFs, nothing collected but the first two lines of
a CSV. For each
input split, ``input_rows == canonical rows + rejected rows``.

Decisions where the spec is silent:

* ``sample_id``: raw Ali-CCP keeps its raw id, shifted per split so train and test (whose raw
  ids overlap in the real release) stay unique: ``raw + SAMPLE_ID_OFFSET[split]`` (train 0,
  valid 2**56, test 2**57); raw ids must lie in [0, 2**56), and every copy of an id that
  appears twice in one split is rejected (``duplicate_sample_id``). The other sources get
  generated ids (``monotonically_increasing_id`` + the split offset; deterministic for the
  same files): PaddleRec part files may restart their ids, AliExpress' ``search_id`` is not
  unique, and the CSVs have none.
* ``_split_key``: a value per row that does not depend on how Spark partitions the input
  (``sample_id`` of generated-id sources encodes the partition, so a split hashing it would
  change with the number of cores). Generated-id sources: ``xxhash64(file base name, raw
  line)`` (identical lines of one file share a key and so a split); raw Ali-CCP: the raw id
  (before the split offset).
* Headers: a file's first line is a header when it looks like one: one of its columns is a
  non-numeric column name of the format (a label such as ``click``, ``search_id``,
  ``D508``; compared ignoring case), or it has several columns and none is empty or a number.
  Any other first line is data (a bad one is rejected like the same line anywhere else).
  Header columns are matched by name, so any column order works; a header without a
  required column is an error naming the file. A headerless file takes the column order of
  the first header found (train, valid, test), else the format's default. A later line equal
  to its file's header is a data line rejected as ``repeated_header`` (concatenated CSVs):
  Spark numbers no lines, so every header-equal line is marked and one per file, the header,
  is left out of the rejects (and of the input rows, which count every raw line less one per
  file with a header). An input split whose files hold no data line (empty, or a header
  only) is an error naming the files.
* Lines holding bytes that are not UTF-8 (Spark's text reader keeps them as they are) are
  rejected (``invalid_utf8``, every source); a U+FFFD character in valid UTF-8 is ordinary
  text. The rejects table keeps the line with U+FFFD in place of the bad bytes (valid UTF-8,
  readable by any Parquet reader; ``aliccp_raw.readable_line``), not the original bytes.
* ``fields`` (the preset) applies to ``aliccp-raw`` and ``paddle-joined``; the CSV sources
  carry their own fields (AITM: every non-label header column; rechub: its 23 sparse
  columns, all single-valued ids; AliExpress: ``categorical_1..16``, group ``context``
  since the release does not say which are user or item fields).
* Empty values are null; in AITM CSVs ``"0"`` is also null (the AITM script writes missing
  as '0'); in rechub and AliExpress CSVs ``"0"`` is a real encoded id. Dense values must
  parse as finite numbers (else ``bad_dense_value``).
* Reasons are checked in a fixed order and a row gets the first one that fails (repeated
  header, encoding, structure, labels, ids, features, join, then ``conversion_without_click``).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from functools import partial, reduce
from typing import Any, Callable, Optional

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from cvr_spark.data import aliccp_raw, jvm_parser
from cvr_spark.data.features import FILE_INDEX
from cvr_spark.data.fields import AITM18, FULL, FieldInfo, aliccp_fields, group_of

SOURCES = ("aliccp-raw", "aitm-csv", "rechub-csv", "paddle-joined", "aliexpress-csv")
REJECT_REASONS = (
    "repeated_header", "invalid_utf8", "bad_column_count", "bad_label", "bad_sample_id",
    "duplicate_sample_id", "malformed_feature", "feature_count_mismatch", "missing_common_key",
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
    # One row (``input_split``) per raw line of every input file, headers included.
    data_lines: Optional[DataFrame] = field(default=None, repr=False)
    # Header lines per input split (one per file that has one): not data lines.
    header_lines: dict[str, int] = field(default_factory=dict)
    # The parsed lines of every split (one row per raw line, with ``input_split``; a CSV
    # header is in it, marked ``repeated_header`` and left out of ``rejects``): the frames
    # above all derive from it, so persisting it parses the input once, not once per frame
    # (and per self-join) that reads it.
    parsed: Optional[DataFrame] = field(default=None, repr=False)
    # How train / valid / test / rejects derive from ``parsed`` (see :meth:`with_parsed`).
    derive: Optional[Callable[[DataFrame], tuple[dict[str, DataFrame], DataFrame]]] = field(
        default=None, repr=False)
    # How the lines were parsed where there is a choice (raw Ali-CCP: "jvm" or "sql").
    parser: Optional[str] = None

    def with_parsed(self, parsed: DataFrame) -> "SourceData":
        """This source with its frames derived from ``parsed``: the parsed lines (the columns of
        :attr:`parsed`) as stored by the caller, e.g. a local checkpoint, which a frame derived
        from the original plan would not read.

        Raises:
            ValueError: this source has no parsed frame to derive from.
        """
        if self.derive is None:
            raise ValueError("this source has no parsed frame to derive its frames from")
        frames, rejects = self.derive(parsed)
        return dataclasses.replace(self, train=frames["train"], valid=frames.get("valid"),
                                   test=frames.get("test"), rejects=rejects, parsed=parsed)

    def input_rows(self) -> dict[str, int]:
        """Data lines read per input split (headers excluded), counted on the raw lines.

        Raises:
            ValueError: an input split has no data line (naming its files).
        """
        counts = {split: 0 for split in self.source_files}
        if self.data_lines is not None:
            for row in self.data_lines.groupBy("input_split").count().collect():
                counts[row["input_split"]] = row["count"]
        counts = {s: n - self.header_lines.get(s, 0) for s, n in counts.items()}
        for split, n in counts.items():
            if n <= 0:
                raise _no_data_error(split, self.source_files[split])
        return counts


def _no_data_error(split: str, files: list[str]) -> ValueError:
    return ValueError(f"input split '{split}' has no data lines: its files {files} are empty "
                      "or hold only a header")


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
                test_input: str = "", parser: str = "auto") -> SourceData:
    """Read one supported input into canonical frames and rejects.

    Args:
        source: one of :data:`SOURCES`.
        input: a file (the train input) or a folder holding the split files.
        fields: field preset (``aitm18`` / ``full``) for ``aliccp-raw`` and ``paddle-joined``.
        test_input: explicit test file (for ``aliccp-raw``: a folder holding the test pair).
        parser: how ``aliccp-raw`` lines are parsed: ``auto`` (the JVM UDF where it can be
            built and loaded, else SQL), ``jvm`` or ``sql`` (:mod:`cvr_spark.data.jvm_parser`);
            the result records it (``SourceData.parser``).

    Raises:
        ValueError: unknown source, preset or parser; a header without a required column.
        RuntimeError: ``parser="jvm"`` and the JVM parser cannot be built or loaded.
        FileNotFoundError: a missing input file or folder, or a folder without a train file.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown source '{source}', expected one of {list(SOURCES)}")
    if parser not in jvm_parser.PARSERS:
        raise ValueError(f"unknown parser '{parser}', expected one of {list(jvm_parser.PARSERS)}")
    if source == "aliccp-raw":
        return _read_aliccp_raw(spark, input, aliccp_fields(fields), test_input, parser)
    files = _resolve_files(spark, source, input, test_input)
    if source == "paddle-joined":
        infos = aliccp_fields(fields)
        parsed = {s: [aliccp_raw.read_joined(spark, p, infos) for p in paths]
                  for s, paths in files.items()}
        lines = {s: [spark.read.text(p) for p in paths] for s, paths in files.items()}
        return _assemble(parsed, lines, files, infos, [])
    return _read_csv(spark, source, CSV_FORMATS[source], files)


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


def _raw_sample_ids(df: DataFrame, split: str, ids: DataFrame) -> DataFrame:
    """``sample_id`` of raw-id sources (the raw id + the split offset) and their id rejects.

    ``ids`` holds the ``_raw_id`` of every line of the split, read apart from the parse (a
    scan of the first column: a few seconds for millions of lines), so that the parsed rows
    come out with their final reasons in one pass and are stored once. The duplicated ids
    are broadcast to the join: every row that carries one is rejected, so they are few in
    any input that passes the reject bound, and the rows are not shuffled.
    """
    offset = F.lit(SAMPLE_ID_OFFSET[split]).cast("long")
    dups = (ids.filter(F.col("_raw_id").isNotNull()).groupBy("_raw_id").count()
            .filter(F.col("count") > 1).select("_raw_id", F.lit(True).alias("_dup")))
    df = df.join(F.broadcast(dups), on="_raw_id", how="left")
    reason = F.coalesce(F.col("_reason"), aliccp_raw.first_reason([
        (F.col("_raw_id") >= F.lit(1 << SAMPLE_ID_BITS), "bad_sample_id"),
        (F.col("_dup").isNotNull(), "duplicate_sample_id")]))
    return df.withColumn("_reason", reason).withColumn("sample_id", F.col("_raw_id") + offset)


def _with_split_key(df: DataFrame, raw_ids: bool) -> DataFrame:
    """``_split_key`` (see the module notes): the raw id, else xxhash64(file base name, line)."""
    if raw_ids:
        return df.withColumn("_split_key", F.col("_raw_id").cast("long"))
    name = F.substring_index(F.col("_source_file"), "/", -1)
    return df.withColumn("_split_key", F.xxhash64(name, F.col("_line")))


def _with_file_index(df: DataFrame, paths: list[str]) -> DataFrame:
    """``_file_index``: the position of the row's input file among its split's files in name
    order (``features.split_column=source_file`` splits by it: the last files are valid)."""
    order = {p: i for i, p in enumerate(sorted(paths, key=lambda p: (p.rsplit("/", 1)[-1], p)))}
    index = F.create_map(*[F.lit(x) for p, i in order.items() for x in (p, i)])
    return df.withColumn(FILE_INDEX, index[F.col("_source_file")].cast("int"))


def _canonical(df: DataFrame, fields: list[FieldInfo], dense: list[str]) -> DataFrame:
    return df.filter(F.col("_reason").isNull()).select(
        F.col("sample_id").cast("long"), F.col("click").cast("int"),
        F.col("conversion").cast("int"), *[F.col(f.name) for f in fields],
        *[F.col(d).cast("double") for d in dense], F.col("_split_key").cast("long"), FILE_INDEX)


def _without_headers(rejects: DataFrame) -> DataFrame:
    """``rejects`` less one ``repeated_header`` row per file: the file's header, not a data
    line (every header-equal line of a file was marked; they are identical, so which one is
    left out does not matter). Only the marked rows are shuffled."""
    marked = F.col("reason") == F.lit("repeated_header")
    counts = rejects.filter(marked).groupBy(*REJECT_COLUMNS).count()
    repeats = counts.select(*REJECT_COLUMNS, F.explode(F.array_repeat(
        F.lit(0), (F.col("count") - 1).cast("int"))).alias("_copy")).drop("_copy")
    return rejects.filter(~marked).unionByName(repeats)


def _assemble(parsed: dict[str, list[DataFrame]], lines: dict[str, list[DataFrame]],
              files: dict[str, list[str]], fields: list[FieldInfo], dense: list[str],
              ids: Optional[dict[str, DataFrame]] = None,
              header_lines: Optional[dict[str, int]] = None) -> SourceData:
    """Per-split parsed frames (one row per raw line) -> :class:`SourceData`.

    All splits meet in one frame (``SourceData.parsed``, every reason final) that the canonical
    frames and the rejects are filtered from (:func:`_derive`), so that one stored frame serves
    them all. ``ids``: for raw-id sources, the raw ids of every line per split
    (:func:`_raw_sample_ids`); None for sources with generated ids. ``header_lines``: files
    with a header per split (their header-equal lines are marked ``repeated_header``).
    """
    header_lines = header_lines or {}
    splits = [s for s in SPLITS if s in parsed]
    per_split = {s: _with_file_index(_with_split_key(reduce(DataFrame.unionByName, parsed[s]), ids is not None),
                                     files[s]) for s in splits}
    if ids is None:
        per_split = {s: _generated_ids(df, s) for s, df in per_split.items()}
    else:
        per_split = {s: _raw_sample_ids(df, s, ids[s]) for s, df in per_split.items()}
    rows = reduce(DataFrame.unionByName, [df.withColumn("input_split", F.lit(s))
                                          for s, df in per_split.items()])
    derive = partial(_derive, splits=splits, fields=fields, dense=dense,
                     header_splits=[s for s in splits if header_lines.get(s)])
    counted = [d.select(F.lit(s).alias("input_split")) for s in splits for d in lines[s]]
    frames, rejects = derive(rows)
    return SourceData(
        train=frames["train"], valid=frames.get("valid"), test=frames.get("test"),
        rejects=rejects, fields=fields, dense_fields=dense,
        source_files={s: files[s] for s in SPLITS if s in files},
        data_lines=reduce(DataFrame.unionByName, counted),
        header_lines={s: n for s, n in header_lines.items() if n}, parsed=rows, derive=derive)


def _derive(rows: DataFrame, splits: list[str], fields: list[FieldInfo], dense: list[str],
            header_splits: list[str]) -> tuple[dict[str, DataFrame], DataFrame]:
    """(canonical frame per split, rejects) filtered from the parsed lines ``rows``; the
    rejects of ``header_splits`` less their files' headers (:func:`_without_headers`)."""
    frames, rejects = {}, []
    for split in splits:
        df = rows.filter(F.col("input_split") == split)
        frames[split] = _canonical(df, fields, dense)
        rejected = df.filter(F.col("_reason").isNotNull()).select(
            F.col("_source_file").alias("source_file"), F.col("_line").alias("line"),
            F.col("_reason").alias("reason"), F.lit(split).alias("input_split"))
        rejects.append(_without_headers(rejected) if split in header_splits else rejected)
    return frames, reduce(DataFrame.unionByName, rejects)


# ---------------------------------------------------------------- raw Ali-CCP


def _read_aliccp_raw(spark: SparkSession, input: str, fields: list[FieldInfo],
                     test_input: str, parser: str) -> SourceData:
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
    jvm = jvm_parser.enable(spark, parser)
    parsed = {s: [aliccp_raw.read_skeleton(
        spark, f[0], aliccp_raw.read_common(spark, f[1], fields, jvm), fields,
        broadcast_common=_size(spark, f[1]) <= BROADCAST_COMMON_MAX_BYTES, jvm=jvm)] for s, f in files.items()}
    lines = {s: [spark.read.text(f[0])] for s, f in files.items()}
    ids = {s: aliccp_raw.read_ids(spark, f[0]) for s, f in files.items()}
    return dataclasses.replace(_assemble(parsed, lines, files, fields, [], ids=ids),
                               parser="jvm" if jvm else "sql")


# ---------------------------------------------------------------- CSV


_NUMBER_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _head(spark: SparkSession, path: str) -> tuple[Optional[str], int]:
    """The first line of a file (None for an empty file) and its line count capped at 2, on
    the driver: the header (if any) and whether a data line follows. The first line is read
    from the split that starts at byte 0 (a bare limit takes the first rows of the first
    partitions, the file's start only while Spark orders a file's splits by offset), as the
    parser sees it (``readable_line``), so a header compares equal to its later copies
    whatever bytes it holds. The count does not depend on the order."""
    lines = spark.read.text(path)
    first = (lines.where(F.input_file_block_start() == 0)
             .select(aliccp_raw.readable_line(F.col("value")).alias("v")).limit(1).collect())
    return (first[0]["v"] if first else None), lines.limit(2).count()


def _is_header(fmt: _CsvFormat, line: str) -> bool:
    """A first line is a header when it names a non-numeric column of the format (ignoring
    case), or has several columns, none of them empty or a number. ``x,0,5,...`` (a bad
    label) and a blank line are data."""
    columns = _columns(line)
    known = {c.lower() for c in (fmt.click, fmt.conversion, *fmt.default_columns, *fmt.dense)
             if not _NUMBER_RE.fullmatch(c)}
    if any(c.lower() in known for c in columns):
        return True
    return len(columns) > 1 and all(c and not _NUMBER_RE.fullmatch(c) for c in columns)


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


def _read_csv(spark: SparkSession, source: str, fmt: _CsvFormat,
              files: dict[str, list[str]]) -> SourceData:
    """Read the CSV files of every split with ``fmt``.

    Raises:
        ValueError: a header without a required column, or an input split without data lines.
    """
    heads = {p: _head(spark, p) for s in SPLITS for p in files.get(s, [])}
    first = {p: line if line is not None and _is_header(fmt, line) else None for p, (line, _) in heads.items()}
    headers = {p: _columns(line) if line is not None else None for p, line in first.items()}
    layout = _layout(fmt, headers)
    labels = [fmt.click, fmt.conversion]
    names = [c for c in layout if c not in labels] if fmt.fields is None else list(fmt.fields)
    order = [c for c in layout if c in names]
    dense = [c for c in layout if c in fmt.dense]
    required = labels + (order if fmt.fields is None else list(fmt.fields)) + list(fmt.dense)
    for path, cols in headers.items():
        _check_header(path, cols if cols is not None else layout, required)
    for split, paths in files.items():
        if all(heads[p][1] <= int(first[p] is not None) for p in paths):
            raise ValueError(f"{source}: {_no_data_error(split, paths)}")
    fields = [FieldInfo(n, fmt.group or group_of(n)) for n in order]
    parsed, lines = {}, {}
    for split, paths in files.items():
        lines[split] = [spark.read.text(p) for p in paths]
        parsed[split] = [_parse_csv(d, p, headers[p] or layout, fmt, order, dense, first[p])
                         for d, p in zip(lines[split], paths)]
    header_lines = {s: sum(first[p] is not None for p in paths) for s, paths in files.items()}
    return _assemble(parsed, lines, files, fields, dense,
                     header_lines=header_lines)


def _parse_csv(lines: DataFrame, path: str, columns: list[str], fmt: _CsvFormat,
               fields: list[str], dense: list[str], header: Optional[str]) -> DataFrame:
    """Parsed rows of one CSV file whose columns are ``columns`` (one per raw line; lines
    equal to ``header``, the file's first line when it is a header, are marked)."""
    split = aliccp_raw.barrier(lines.select(
        aliccp_raw.readable_line(F.col("value")).alias("_line"), aliccp_raw.not_utf8(F.col("value")).alias("_bad_utf8"),
        F.split(F.regexp_replace(F.col("value"), "\r$", ""), ",", -1).alias("_parts")))

    def value(name: str) -> Column:
        return F.trim(F.get(F.col("_parts"), columns.index(name)))

    missing = ["", "0"] if fmt.zero_is_missing else [""]
    values = split.select(
        F.lit(path).alias("_source_file"), "_line", "_bad_utf8", F.size("_parts").alias("_ncols"),
        value(fmt.click).alias("click"), value(fmt.conversion).alias("conversion"),
        *[F.when(~value(f).isin(*missing), value(f)).alias(f) for f in fields],
        *[value(d).try_cast("double").alias(d) for d in dense])
    bad_dense = F.exists(F.array(*dense), lambda x: F.isnull(x) | F.isnan(x) | (
        F.abs(x) == float("inf"))) if dense else F.lit(False)
    bad_label, no_click = aliccp_raw.label_checks(F.col("click"), F.col("conversion"))
    repeated = F.col("_line") == F.lit(header) if header is not None else F.lit(False)
    reason = aliccp_raw.first_reason([
        (repeated, "repeated_header"),
        (F.col("_bad_utf8"), "invalid_utf8"),
        (F.col("_ncols") != len(columns), "bad_column_count"),
        (bad_label, "bad_label"),
        (bad_dense, "bad_dense_value"),
        (no_click, "conversion_without_click"),
    ])
    return aliccp_raw.barrier(values.withColumn("_reason", reason))
