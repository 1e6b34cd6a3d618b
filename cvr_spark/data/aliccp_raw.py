"""Parsers of the Ali-CCP feature-list formats: the raw release and PaddleRec's joined text.

Both return a *parsed* DataFrame with one row per data line: ``_source_file``, ``_line`` (the
raw line), ``_reason`` (null for a valid row, else the reject reason), ``_raw_id`` (the line's
sample id as a long, null when unparseable), ``click``/``conversion`` (strings, validated by
``_reason``) and one column per field (string, or ``array<string>`` for multi-valued fields).
:mod:`cvr_spark.data.sources` turns it into the canonical frame and the rejects.

Raw Ali-CCP lines are parsed either by Spark SQL expressions (below) or by the JVM UDF of
:mod:`cvr_spark.data.jvm_parser` (``jvm=True``; 2.9 s against 7.9 s for 2.5M lines up to the
field columns), which give the same rows (``test_aliccp_raw``); :func:`_parse_lines` chooses.

Raw Ali-CCP (Tianchi 408):

* skeleton line ``sample_id,click,buy,common_feature_key,feature_count,feature_list``;
* common line ``common_feature_key,feature_count,feature_list``;
* ``feature_list``: features separated by ``\\x01``, each ``field\\x02feature_id\\x03value``.

Decisions (the spec is silent on them):

* The raw id of a field is ``feature_id`` (the global id); the float ``value`` is validated
  (it must parse as a number) and then dropped.
* ``feature_count`` must equal the number of features in the list, else the line is rejected
  with ``feature_count_mismatch`` (a separate reason from ``malformed_feature`` so that the
  two kinds of damage can be counted apart). An empty list with count 0 is valid.
* A single-valued field that appears more than once in a list keeps its first occurrence
  (field 210 does repeat in PaddleRec's joined rows). When a single-valued field is in both
  the skeleton and the common list, the skeleton's (sample-level) value wins; multi-valued
  fields concatenate skeleton values, then common values.
* Common lines are not samples: a damaged common line (bad column count, malformed feature,
  count mismatch) or a key that has several common lines rejects the *skeleton* rows that
  use it (``malformed_common_feature`` / ``duplicate_common_key``), so that the row
  accounting stays per skeleton line.
* Fields outside the preset are ignored.
* A line holding bytes that are not UTF-8 is rejected (``invalid_utf8``; a common line with
  them rejects its skeleton rows as ``malformed_common_feature``). The rejects table keeps the
  line with U+FFFD in place of the bad bytes (:func:`readable_line`: a Parquet string column
  must hold UTF-8 for readers such as pyarrow). A U+FFFD character in valid UTF-8 is ordinary text.
"""
from __future__ import annotations

from typing import Sequence

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from cvr_spark.data import jvm_parser
from cvr_spark.data.fields import FieldInfo, safe_name

FEATURE_SEP, ID_SEP, VALUE_SEP = "\x01", "\x02", "\x03"
_NUMBER = r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?"
# field \x02 feature_id \x03 value; no separator byte inside a part.
RAW_FEATURE_RE = f"^[^\x01\x02\x03]+\x02[^\x01\x02\x03]+\x03{_NUMBER}$"
# A token's \x02 feature_id \x03 value, up to the token's end (what follows its field name).
ID_VALUE_RE = f"\x02[^\x01\x02\x03]+\x03{_NUMBER}(?=\x01|\\z)"
# PaddleRec joined token: field:feature_id.
JOINED_FEATURE_RE = r"^[^:,\s]+:[^:,\s]+$"
LABELS = ("0", "1")


def first_reason(checks: Sequence[tuple[Column, str]]) -> Column:
    """The reason of the first failing check, else null.

    A check whose condition evaluates to null (it could not be evaluated) counts as failing,
    so that a row is never accepted by accident.
    """
    out = F.lit(None).cast("string")
    for cond, reason in reversed(checks):
        out = F.when(F.coalesce(cond, F.lit(True)), F.lit(reason)).otherwise(out)
    return out


def label_checks(click: Column, conversion: Column) -> tuple[Column, Column]:
    """(labels not 0/1, conversion without click) conditions on string label columns."""
    bad = ~(click.isin(*LABELS) & conversion.isin(*LABELS))
    return bad, (click == "0") & (conversion == "1")


def field_columns(pairs: str, fields: Sequence[FieldInfo], prefix: str = "") -> list[Column]:
    """One column per field from the column named ``pairs`` (array<struct<field, fid>>).

    Single-valued fields take the first occurrence (null when absent); multi-valued fields
    take every occurrence in list order (empty array when absent). Written as SQL text:
    one expression per field instead of several JVM round trips per lambda.
    """
    cols = []
    for info in fields:
        ids = f"transform(filter(`{pairs}`, p -> p.field = '{safe_name(info)}'), p -> p.fid)"
        cols.append(F.expr(ids if info.multi else f"get({ids}, 0)").alias(prefix + info.name))
    return cols


def barrier(df: DataFrame) -> DataFrame:
    """``df`` with its columns computed once per row, before any later filter.

    Spark pushes a filter below a projection by inlining the projected expressions into the
    condition, so a filter on ``_reason`` would re-split every line once per referenced
    column. A generator is not looked through: ``inline(array(struct(*cols)))`` (one row in,
    one row out) pins the columns in place.
    """
    return df.select(F.inline(F.array(F.struct(*[F.col(c) for c in df.columns]))))


def not_utf8(value: Column) -> Column:
    """The raw line holds bytes that are not UTF-8. Spark's text reader keeps a line's bytes as
    they are and raises nothing; they would become ids (all decoded to the same U+FFFD text)."""
    return ~F.is_valid_utf8(value)


def readable_line(value: Column) -> Column:
    """The raw line as stored in the rejects table: as read when it is UTF-8, else with U+FFFD
    in place of the bad bytes (a Parquet string column must be UTF-8 for readers such as
    pyarrow). Only invalid lines pay for the repair."""
    return F.when(F.is_valid_utf8(value), value).otherwise(F.make_valid_utf8(value))


def _raw_list(feature_list: Column, tokens: bool = False) -> list[Column]:
    """A feature list's columns ``_parts`` (the list split at every ``\\x02``), ``_names`` (the
    field name of every token, in list order), ``_nfeat`` (the number of features, 0 for an
    empty list), ``_feat_bad`` (a token does not match :data:`RAW_FEATURE_RE`) and, with
    ``tokens``, ``_tokens`` (its ``\\x01``-separated features: multi-valued fields need them).

    One regex pass over the list: removing every :data:`ID_VALUE_RE` match (``\\x02id\\x03value``
    ending its token) leaves the field names. The list is well formed when it holds exactly one
    ``\\x02`` per token, no ``\\x02`` or ``\\x03`` is left and no name is empty: then every
    ``\\x02`` began a match, a match cannot cross a token and ends one, so each token is
    ``name`` + one match, which is :data:`RAW_FEATURE_RE` (``test_aliccp_raw`` checks the two
    against each other). A match holds no ``\\x01``, so the names are as many as the tokens. In
    a well-formed list, part ``j`` (``j >= 1``) of ``_parts`` begins with the id of token
    ``j - 1`` and its ``\\x03`` (:func:`raw_field_columns`); the one split serves the count of
    ``\\x02`` and the ids, where splitting the tokens too cost 1.4-3 s more per 2.5M lines
    (three interleaved rounds: 7.4-9.6 s against 9.0-12.6 s). Each array is one split, not a
    split inside ``when(list == '')``: Spark's common-subexpression elimination does not reach
    into a conditional branch, and the regex would run twice. An empty list thus gives
    ``['']``, which matches no field name. A per-token regex (a higher-order function) is
    several times slower, and a whole-list pattern ``^T(\\x01T)*$`` overflows Java's regex
    stack on a real Ali-CCP common line (about 870 features per user): the JVM dies.
    """
    parts = F.split(feature_list, ID_SEP, -1)
    left = F.regexp_replace(feature_list, ID_VALUE_RE, "")
    names = F.split(left, FEATURE_SEP, -1)
    empty = feature_list == ""
    one_id_each = F.size(parts) == F.size(names) + 1
    clean = (F.instr(left, ID_SEP) == 0) & (F.instr(left, VALUE_SEP) == 0) & ~F.array_contains(names, "")
    out = [parts.alias("_parts"), names.alias("_names"),
           (F.size(names) - empty.cast("int")).alias("_nfeat"),
           (~empty & ~(one_id_each & clean)).alias("_feat_bad")]
    return out + ([F.split(feature_list, FEATURE_SEP, -1).alias("_tokens")] if tokens else [])


def raw_field_columns(fields: Sequence[FieldInfo], prefix: str = "") -> list[Column]:
    """One column per field from a list's :func:`_raw_list` columns (``_parts``, ``_names`` and,
    for multi-valued fields, ``_tokens``); the values are those of a well-formed list.

    A single-valued field is looked up with ``array_position`` (compiled, first occurrence,
    null when absent: position 0 becomes a null index): token ``j``'s id is part ``j + 1`` up
    to its ``\\x03``. A multi-valued field keeps every occurrence in list order (a filter
    lambda, used only for the multi-valued fields; empty array when absent). Written as SQL
    text, one call per field: built with the Python column functions they were a quarter of
    the raw reader's 15k JVM round trips while its plan is built. The separators stand in the
    SQL string literals as the characters themselves, not as ``\\u0002`` escapes, which
    ``spark.sql.parser.escapedStringLiterals=true`` would leave as six characters.
    """
    cols = []
    for info in fields:
        name = safe_name(info)
        if info.multi:
            fid = f"substring_index(substring_index(t, '{ID_SEP}', -1), '{VALUE_SEP}', 1)"
            sql = f"transform(filter(`_tokens`, t -> substring_index(t, '{ID_SEP}', 1) = '{name}'), t -> {fid})"
        else:
            sql = f"substring_index(get(`_parts`, nullif(array_position(`_names`, '{name}'), 0)), '{VALUE_SEP}', 1)"
        cols.append(F.expr(sql).alias(prefix + name))
    return cols


def _any_multi(fields: Sequence[FieldInfo]) -> bool:
    return any(f.multi for f in fields)


def _malformed(tokens: Column, pattern: str) -> Column:
    return F.exists(tokens, lambda t: ~t.rlike(pattern))


def _split_lines(spark: SparkSession, path: str, first: bool = False) -> DataFrame:
    """``_source_file``, ``_line``, ``_utf8_bad``, ``_parts`` (the comma-separated columns)
    and with ``first`` ``_first`` (the first column as its bytes: ``split`` works on the line
    decoded, with U+FFFD in place of bytes that are not UTF-8) of a file. Spark's text reader
    (Hadoop's line reader) ends a line at LF, CR or CRLF, so no line holds a carriage return:
    CRLF files need no cleaning (``test_sources`` reads one)."""
    value = F.col("value")
    extra = [F.substring_index(value, ",", 1).alias("_first")] if first else []
    return barrier(spark.read.text(path).select(
        *_line_columns(path), F.split(value, ",", -1).alias("_parts"), *extra))


def _line_columns(path: str) -> list[Column]:
    """``_source_file``, ``_line`` (:func:`readable_line`) and ``_utf8_bad`` of a text frame's
    ``value``, the columns every parser keeps per line."""
    value = F.col("value")
    return [F.lit(path).alias("_source_file"), readable_line(value).alias("_line"),
            not_utf8(value).alias("_utf8_bad")]


def raw_sample_id(first_column: Column) -> Column:
    """A skeleton line's raw sample id (long; null when it is not one) from its first column."""
    return first_column.try_cast("long")


def read_ids(spark: SparkSession, path: str) -> DataFrame:
    """``_raw_id`` of every line of a skeleton file, as :func:`read_skeleton` reads it, from a
    scan of the first column alone (the duplicate-id check needs every id of the file)."""
    return spark.read.text(path).select(
        raw_sample_id(F.substring_index(F.col("value"), ",", 1)).alias("_raw_id"))


def _parse_lines(spark: SparkSession, path: str, list_column: int, fields: Sequence[FieldInfo],
                 prefix: str, jvm: bool) -> DataFrame:
    """One row per line of a raw file: ``_source_file``, ``_line``, ``_utf8_bad``, ``_ncols``,
    ``_h0`` .. (the ``list_column`` columns before the feature list, strings, null where the
    line is shorter), ``_nfeat``, ``_feat_bad`` (see :func:`_raw_list`) and the fields prefixed
    ``prefix``. ``jvm``: parse with the JVM UDF (:mod:`cvr_spark.data.jvm_parser`, registered
    on the session), else with the SQL expressions; the two give the same rows (field values
    where the list is well formed). Both see the line decoded, with U+FFFD in place of bytes
    that are not UTF-8 (such a line is rejected), except the first column, a common key or a
    sample id, which is taken as its bytes: a key with bad bytes is not the key that holds
    U+FFFD itself."""
    head = [f"_h{i}" for i in range(list_column)]
    if jvm:
        value = F.col("value")
        lines = barrier(spark.read.text(path).select(
            *_line_columns(path), F.substring_index(value, ",", 1).alias("_h0"),
            jvm_parser.line_struct(value, list_column, fields).alias("_p")))
        return lines.select(
            "_source_file", "_line", "_utf8_bad", F.col("_p.ncols").alias("_ncols"), "_h0",
            *[F.get(F.col("_p.head"), i).alias(h) for i, h in enumerate(head) if i > 0],
            F.col("_p.nfeat").alias("_nfeat"), F.col("_p.bad").alias("_feat_bad"),
            *jvm_parser.field_columns("_p", fields, prefix))
    parts = F.col("_parts")
    tokens = barrier(_split_lines(spark, path, first=True).select(
        "_source_file", "_line", "_utf8_bad", F.size(parts).alias("_ncols"), F.col("_first").alias("_h0"),
        *[F.get(parts, i).alias(h) for i, h in enumerate(head) if i > 0],
        *_raw_list(F.get(parts, list_column), _any_multi(fields))))
    return tokens.select("_source_file", "_line", "_utf8_bad", "_ncols", *head, "_nfeat", "_feat_bad",
                         *raw_field_columns(fields, prefix))


def read_common(spark: SparkSession, path: str, fields: Sequence[FieldInfo], jvm: bool = False) -> DataFrame:
    """The common-features file, one row per key: ``_key``, ``_n`` (lines with that key),
    ``_bad`` (1 when a line of the key is damaged) and the fields prefixed ``_c_``
    (``jvm``: see :func:`_parse_lines`)."""
    lines = _parse_lines(spark, path, 2, fields, "_c_", jvm)
    count = F.col("_h1").try_cast("int")
    bad = (F.col("_ncols") != 3) | (count != F.col("_nfeat")) | F.col("_feat_bad") | F.col("_utf8_bad")
    parsed = lines.select(F.col("_h0").alias("_key"), F.coalesce(bad, F.lit(True)).cast("int").alias("_bad"),
                          *["_c_" + f.name for f in fields])
    return parsed.groupBy("_key").agg(
        F.count(F.lit(1)).alias("_n"), F.max("_bad").alias("_bad"),
        *[F.first("_c_" + f.name).alias("_c_" + f.name) for f in fields])


def read_skeleton(spark: SparkSession, path: str, common: DataFrame,
                  fields: Sequence[FieldInfo], broadcast_common: bool = False, jvm: bool = False) -> DataFrame:
    """Parsed skeleton rows of one file joined (left) with their common features
    (``broadcast_common``: hint the common table BROADCAST, for a small common file; ``jvm``:
    see :func:`_parse_lines`)."""
    lines = _parse_lines(spark, path, 5, fields, "_s_", jvm)
    base = lines.select(
        "_source_file", "_line", "_ncols", raw_sample_id(F.col("_h0")).alias("_raw_id"),
        F.col("_h1").alias("click"), F.col("_h2").alias("conversion"), F.col("_h3").alias("_key"),
        "_utf8_bad", (F.col("_h4").try_cast("int") != F.col("_nfeat")).alias("_count_bad"), "_feat_bad",
        *["_s_" + f.name for f in fields])
    joined = base.join(F.broadcast(common) if broadcast_common else common, on="_key", how="left")
    bad_label, no_click = label_checks(F.col("click"), F.col("conversion"))
    reason = first_reason([
        (F.col("_utf8_bad"), "invalid_utf8"),
        (F.col("_ncols") != 6, "bad_column_count"),
        (bad_label, "bad_label"),
        (F.col("_raw_id").isNull() | (F.col("_raw_id") < 0), "bad_sample_id"),
        (F.col("_feat_bad"), "malformed_feature"),
        (F.col("_count_bad"), "feature_count_mismatch"),
        (F.col("_n").isNull(), "missing_common_key"),
        (F.col("_n") > 1, "duplicate_common_key"),
        (F.col("_bad") == 1, "malformed_common_feature"),
        (no_click, "conversion_without_click"),
    ])
    return barrier(joined.select(
        "_source_file", "_line", reason.alias("_reason"), "_raw_id", "click", "conversion",
        *[_merge(f) for f in fields]))


def _merge(info: FieldInfo) -> Column:
    """A field's value from the skeleton (``_s_``) and common (``_c_``) sides."""
    name = safe_name(info)
    if info.multi:
        return F.expr(f"concat(`_s_{name}`, coalesce(`_c_{name}`, CAST(array() AS array<string>)))").alias(name)
    return F.expr(f"coalesce(`_s_{name}`, `_c_{name}`)").alias(name)


def read_joined(spark: SparkSession, path: str, fields: Sequence[FieldInfo]) -> DataFrame:
    """Parsed rows of a PaddleRec joined text file ``sample_id,click,buy,field:feat,...``."""
    parts = F.col("_parts")
    tokens = barrier(_split_lines(spark, path).select(
        "_source_file", "_line", "_utf8_bad", F.size(parts).alias("_ncols"),
        F.get(parts, 0).try_cast("long").alias("_raw_id"),
        F.get(parts, 1).alias("click"), F.get(parts, 2).alias("conversion"),
        F.filter(parts, lambda _, i: i >= 3).alias("_tokens")))
    pairs = F.transform("_tokens", lambda t: F.struct(
        F.substring_index(t, ":", 1).alias("field"), F.substring_index(t, ":", -1).alias("fid")))
    parsed = tokens.select(
        "_source_file", "_line", "_utf8_bad", "_ncols", "_raw_id", "click", "conversion",
        _malformed(F.col("_tokens"), JOINED_FEATURE_RE).alias("_feat_bad"), pairs.alias("_pairs"))
    parsed = parsed.select("*", *field_columns("_pairs", fields))
    bad_label, no_click = label_checks(F.col("click"), F.col("conversion"))
    reason = first_reason([
        (F.col("_utf8_bad"), "invalid_utf8"),
        (F.col("_ncols") < 3, "bad_column_count"),
        (bad_label, "bad_label"),
        (F.col("_raw_id").isNull(), "bad_sample_id"),
        (F.col("_feat_bad"), "malformed_feature"),
        (no_click, "conversion_without_click"),
    ])
    return barrier(parsed.select("_source_file", "_line", reason.alias("_reason"), "_raw_id",
                                 "click", "conversion", *[f.name for f in fields]))
