"""The raw Ali-CCP parser on lines of real length and on bytes that are not UTF-8.

Real Ali-CCP common-feature lines carry about 870 features per user (the multi-valued ``*_14``
history); the hand-made fixture and the simulator write short ones. Expected values come from
the lines as written here, never from the parser.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from pyspark.sql import functions as F

from cvr_spark.data.sources import read_source

# Both line parsers (cvr_spark.data.jvm_parser): the JVM UDF and the SQL expressions.
both_parsers = pytest.mark.parametrize("parser", ["jvm", "sql"])

SEP, ID, VAL = "\x01", "\x02", "\x03"


def feature(field: str, fid: str, value: str = "1.0") -> str:
    return f"{field}{ID}{fid}{VAL}{value}"


def history(n: int) -> list[str]:
    """``n`` multi-valued user features over the four ``*_14`` fields."""
    fields = ("109_14", "110_14", "127_14", "150_14")
    return [feature(fields[i % 4], f"h{i}", "0.5") for i in range(n)]


def write_raw(folder: Path, skeleton: list[bytes], common: list[bytes]) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sample_skeleton_train.csv").write_bytes(b"\n".join(skeleton) + b"\n")
    (folder / "common_features_train.csv").write_bytes(b"\n".join(common) + b"\n")
    return str(folder)


def line(*parts: str) -> bytes:
    return ",".join(parts).encode()


def grammar(text: str) -> tuple[list[str], bool]:
    """The oracle of the list checks: a feature list's tokens, and whether one of them breaks
    the token grammar (:data:`RAW_FEATURE_RE`, matched in Python)."""
    import re

    from cvr_spark.data.aliccp_raw import RAW_FEATURE_RE

    tokens = text.split(SEP) if text else []
    return tokens, not all(re.fullmatch(RAW_FEATURE_RE, t, re.ASCII) for t in tokens)


@both_parsers
def test_real_length_common_lines_parse_and_a_bad_token_among_them_is_found(spark, tmp_path, parser):
    user = [feature("101", "u1"), feature("121", "g1"), *history(1500)]
    broken = list(user)
    broken[900] = "109_14" + ID + "h900" + VAL + "abc"  # a value that is not a number, deep in the line
    common = [line("k1", str(len(user)), SEP.join(user)), line("k2", str(len(broken)), SEP.join(broken))]
    items = [feature("205", "i1"), feature("301", "c1")]
    skeleton = [line("1", "1", "0", "k1", "2", SEP.join(items)),
                line("2", "0", "0", "k2", "2", SEP.join(items)),
                line("3", "1", "1", "k1", "2", SEP.join(items))]
    data = read_source(spark, "aliccp-raw", write_raw(tmp_path / "raw", skeleton, common), fields="full",
                       parser=parser)
    rows = {r["sample_id"]: r for r in data.train.collect()}
    assert sorted(rows) == [1, 3]
    assert rows[1]["101"] == "u1" and rows[1]["205"] == "i1" and rows[1]["301"] == "c1"
    assert rows[1]["109_14"] == [f"h{i}" for i in range(0, 1500, 4)]  # list order kept
    assert len(rows[1]["150_14"]) == 375
    rejects = {(r["line"].split(",")[0], r["reason"]) for r in data.rejects.collect()}
    assert rejects == {("2", "malformed_common_feature")}
    assert data.input_rows() == {"train": 3}


@both_parsers
def test_bytes_that_are_not_utf8_are_rejected(spark, tmp_path, parser):
    items = SEP.join([feature("205", "i1"), feature("301", "c1")])
    bad_item = SEP.join([feature("205", "i1"), feature("301", "c1")]).encode().replace(b"c1", b"\xff\xfe")
    user = SEP.join([feature("101", "u1")])
    bad_user = user.encode().replace(b"u1", b"\xc3(")
    common = [line("k1", "1", user), b"k2,1," + bad_user]
    skeleton = [line("1", "0", "0", "k1", "2", items),
                b"2,0,0,k1,2," + bad_item,
                line("3", "1", "0", "k2", "2", items),
                line("4", "1", "0", "k1", "2", items)]
    data = read_source(spark, "aliccp-raw", write_raw(tmp_path / "raw", skeleton, common), parser=parser)
    assert sorted(r["sample_id"] for r in data.train.collect()) == [1, 4]
    reasons = {r["line"].split(",")[0]: r["reason"] for r in data.rejects.collect()}
    assert reasons == {"2": "invalid_utf8", "3": "malformed_common_feature"}
    assert data.input_rows() == {"train": 4}


def test_paddle_joined_bytes_that_are_not_utf8_are_rejected(spark, tmp_path):
    path = tmp_path / "train.txt"
    path.write_bytes(b"1,1,0,101:u1,205:i1\n2,0,0,101:\xff\xfe,205:i1\n3,0,0,101:u2,205:i2\n")
    data = read_source(spark, "paddle-joined", str(path), fields="aitm18")
    assert data.train.count() == 2
    assert [(r["reason"]) for r in data.rejects.select("reason").collect()] == ["invalid_utf8"]
    assert data.rejects.where(F.col("line").startswith("2,")).count() == 1


@both_parsers
def test_single_field_lookup_matches_whole_field_names_only(spark, tmp_path, parser):
    """A single-valued field is found by its whole name at a feature's start: ``127`` is not
    ``127_14`` (a multi-valued field), nor an id or a value that reads ``127``; the first of
    two occurrences wins, in the skeleton as in the common list."""
    common = [line("k1", "3", SEP.join([feature("127_14", "h1"), feature("101", "127"),
                                        feature("127", "u127")])),
              line("k2", "2", SEP.join([feature("127_14", "h2"), feature("1270", "x")]))]
    skeleton = [line("1", "1", "0", "k1", "3", SEP.join([feature("205", "127", "127"),
                                                         feature("210", "a"), feature("210", "b")])),
                line("2", "0", "0", "k2", "1", feature("301", "c" * 300)),
                line("3", "0", "0", "k2", "2", SEP.join([feature("301", "s"), feature("127", "s127")]))]
    data = read_source(spark, "aliccp-raw", write_raw(tmp_path / "raw", skeleton, common), fields="full",
                       parser=parser)
    rows = {r["sample_id"]: r for r in data.train.collect()}
    assert sorted(rows) == [1, 2, 3]
    assert (rows[1]["127"], rows[1]["127_14"], rows[1]["101"]) == ("u127", ["h1"], "127")
    assert (rows[1]["205"], rows[1]["210"], rows[1]["301"]) == ("127", "a", None)
    assert (rows[2]["127"], rows[2]["127_14"], rows[2]["301"]) == (None, ["h2"], "c" * 300)
    assert (rows[3]["127"], rows[3]["301"]) == ("s127", "s")
    assert data.rejects.count() == 0


def test_feature_list_checks_agree_with_the_token_grammar(spark):
    """``_raw_list`` judges a list by counts after one regex replace; the oracle is the token
    grammar itself (:data:`RAW_FEATURE_RE`, matched token by token in Python): hand-picked
    damage plus random strings over the separators, digits and the characters of a number."""
    import random

    from cvr_spark.data.aliccp_raw import _raw_list

    picked = ["", feature("a", "b"), SEP.join([feature("a", "b"), feature("c", "d", "-2e5")]),
              "ab", f"a{ID}b", f"{ID}b{VAL}1", f"a{ID}{VAL}1", f"a{ID}b{VAL}", f"a{ID}b{VAL}x",
              f"a{ID}b{VAL}1{ID}c{VAL}1", f"a{VAL}x{ID}b{VAL}1", feature("a", "b") + SEP, SEP + feature("a", "b"),
              feature("a", "b") + SEP + SEP + feature("c", "d"), feature("a", "b", ".5") + SEP + feature("c", "d", "1."),
              feature("a", "b") + VAL, feature("a", "b", "1e"), feature("a", "b", "+1E-3"), feature("a b", "c")]
    rng = random.Random(7)
    alphabet = ["a", "7", ".", "e", "-", SEP, ID, VAL, ID, VAL, SEP]
    fuzz = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 14))) for _ in range(400)]
    fuzz += [SEP.join(feature(rng.choice("ab"), rng.choice("7x"), rng.choice(["1", "1.5", "e", "-.5", "7e"]))
                      for _ in range(rng.randint(1, 4))) for _ in range(200)]
    cases = list(dict.fromkeys(picked + fuzz))
    got = spark.createDataFrame([(i, s) for i, s in enumerate(cases)], "i int, l string") \
        .select("i", *_raw_list(F.col("l"), tokens=True)).collect()
    got = {r["i"]: r for r in got}
    bad_seen = 0
    for i, text in enumerate(cases):
        tokens, bad = grammar(text)
        bad_seen += bad
        row = got[i]
        assert (row["_feat_bad"], row["_nfeat"]) == (bad, len(tokens)), repr(text)
        if not bad and tokens:
            assert row["_tokens"] == tokens and row["_names"] == [t.split(ID)[0] for t in tokens], repr(text)
            assert row["_parts"] == text.split(ID), repr(text)
    assert 0 < bad_seen < len(cases)  # both kinds are exercised


def test_raw_reader_does_not_depend_on_sql_escape_setting(spark, tmp_path):
    """The reader's SQL text holds the separators as characters: a session with
    ``spark.sql.parser.escapedStringLiterals=true`` (which keeps ``\\u0002`` as six characters)
    reads the same field values."""
    common = [line("k1", "1", feature("101", "u1"))]
    skeleton = [line("1", "1", "0", "k1", "2", SEP.join([feature("205", "i1"), feature("301", "c1")]))]
    folder = write_raw(tmp_path / "raw", skeleton, common)
    key = "spark.sql.parser.escapedStringLiterals"
    before = spark.conf.get(key)
    spark.conf.set(key, "true")
    try:
        row = read_source(spark, "aliccp-raw", folder).train.first()
    finally:
        spark.conf.set(key, before)
    assert (row["101"], row["205"], row["301"]) == ("u1", "i1", "c1")


def test_jvm_parser_agrees_with_the_token_grammar(spark):
    """The JVM UDF's count, damage flag and field values against the token grammar
    (:data:`RAW_FEATURE_RE`, matched in Python), on hand-picked damage and random lists over
    the separators, digits and the characters of a number; the list is a line's second column."""
    import random

    from cvr_spark.data import jvm_parser
    from cvr_spark.data.fields import FieldInfo

    assert jvm_parser.enable(spark, "jvm")
    fields = [FieldInfo("a", "user"), FieldInfo("b", "item", multi=True), FieldInfo("ab", "item")]
    rng = random.Random(11)
    alphabet = ["a", "b", "7", ".", "e", "-", "+", "E", SEP, ID, VAL, ID, VAL, SEP]
    cases = ["", feature("a", "1"), feature("a", "1") + SEP + feature("a", "2") + SEP + feature("b", "3")
             + SEP + feature("b", "4", "-.5E+3") + SEP + feature("ab", "5", "7."), f"a{ID}1{VAL}1\u2028",
             feature("a", "1", "1e"), feature("a", "1", "."), feature("a", "1", "+"), feature("a", "1", "1.5.")]
    cases += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 16))) for _ in range(600)]
    cases += [SEP.join(feature(rng.choice(["a", "b", "ab", "c"]), rng.choice("78x"),
                               rng.choice(["1", "1.5", "e", "-.5", "7e", ".", "2E-1", "+3."]))
                       for _ in range(rng.randint(1, 5))) for _ in range(300)]
    cases = list(dict.fromkeys(cases))
    frame = spark.createDataFrame([(i, s) for i, s in enumerate(cases)], "i int, l string")
    got = {r["i"]: r["p"] for r in frame.select(
        "i", jvm_parser.line_struct(F.concat(F.lit("x,"), "l"), 1, fields).alias("p")).collect()}
    bad_seen = 0
    for i, text in enumerate(cases):
        tokens, bad = grammar(text)
        bad_seen += bad
        p = got[i]
        assert (p["ncols"], p["head"], p["nfeat"], p["bad"]) == (2, ["x"], len(tokens), bad), repr(text)
        if not bad:
            pairs = [(t.split(ID)[0], t.split(ID)[1].split(VAL)[0]) for t in tokens]
            first = {n: next((v for m, v in pairs if m == n), None) for n in ("a", "ab")}
            assert p["single"] == [first["a"], first["ab"]], repr(text)
            assert p["multi"] == [[v for m, v in pairs if m == "b"]], repr(text)
    assert 0 < bad_seen < len(cases)  # both kinds are exercised


def test_jvm_and_sql_parsers_give_the_same_rows(spark, tmp_path):
    """Every column of every parsed line (reasons included; field values where the line is
    accepted) is the same from both parsers, on
    random raw files: damaged columns, labels, counts and features, skeleton fields that
    override or add to the common ones, missing and duplicated common keys, and keys or lines
    with bytes that are not UTF-8 beside a key that holds U+FFFD itself."""
    import random

    from cvr_spark.data.fields import FULL

    rng = random.Random(5)
    names = ["101", "121", "205", "301", "109_14", "150_14", "999"]

    def features() -> list[str]:
        out = [feature(rng.choice(names), rng.choice(["1", "2", "33", "x"]),
                       rng.choice(["1.0", "0.5", "2e3", "1.0", "z", ""])) for _ in range(rng.randint(0, 6))]
        if out and rng.random() < 0.1:
            out[rng.randrange(len(out))] = rng.choice(["205", f"205{ID}{ID}1{VAL}1", f"{ID}1{VAL}1"])
        return out

    keys = [f"k{i}" for i in range(8)]
    common = []
    for key in keys + ["k0", "k\ufffd"]:  # k0 twice: a duplicated key
        fs = features()
        count = str(len(fs)) if rng.random() < 0.9 else "9"
        common.append(line(key, count, SEP.join(fs)))
    common += [b"k\xff,1," + feature("101", "u9").encode(), line("k6", "1"), b""]
    skeleton = []
    for i in range(400):
        fs = features()
        cols = [str(i) if rng.random() < 0.95 else rng.choice(["-1", "1x", "", str(i - 1)]),
                rng.choice("0011 2"), rng.choice("0001"), rng.choice(keys + ["k\ufffd", "nokey"]),
                str(len(fs)) if rng.random() < 0.9 else "7", SEP.join(fs)]
        if rng.random() < 0.05:
            cols = cols[:rng.randint(1, 5)] if rng.random() < 0.5 else cols + ["extra"]
        raw = line(*cols)
        if rng.random() < 0.03:
            raw = raw.replace(b"k", b"k\xfe", 1) if rng.random() < 0.5 else raw + b"\xff"
        skeleton.append(raw)
    folder = write_raw(tmp_path / "raw", skeleton, common)
    columns = ["_line", "_reason", "_raw_id", "click", "conversion", "sample_id", *FULL]

    def rows(parser: str) -> list[tuple]:
        """Every column; the field values of a rejected line are left out (only its line and
        reason are kept, and a damaged list has no defined values)."""
        data = read_source(spark, "aliccp-raw", folder, fields="full", parser=parser)
        assert data.parser == parser
        got = data.parsed.select(*columns).collect()
        return sorted(tuple(repr(v) for v in (r if r["_reason"] is None else r[:6])) for r in got)

    jvm, sql = rows("jvm"), rows("sql")
    assert len(jvm) == len(skeleton)
    assert jvm == sql
    # the key that holds U+FFFD has one common line: the line whose key has a bad byte is another key
    fffd = [r for r in jvm if r[0].split(",")[3:4] == ["k\ufffd"] and "invalid_utf8" not in r[1]]
    assert fffd and not any("duplicate_common_key" in r[1] for r in fffd)
    reasons = {r[1] for r in jvm}
    assert {"None", "'malformed_feature'", "'feature_count_mismatch'", "'missing_common_key'",
            "'duplicate_common_key'", "'malformed_common_feature'", "'bad_column_count'",
            "'invalid_utf8'", "'bad_label'", "'bad_sample_id'"} <= reasons


def test_jvm_parser_enable_modes_and_build_errors(spark, tmp_path, monkeypatch, caplog):
    """``sql`` never registers the UDF; ``jvm`` raises where it cannot be built, ``auto`` falls
    back to SQL and logs why; javac's errors and a missing javac are named."""
    import logging

    from cvr_spark.config import SparkConfig
    from cvr_spark.data import jvm_parser

    assert jvm_parser.DEFAULT_CACHE == SparkConfig().jars_cache
    with pytest.raises(ValueError, match="features.parser must be one of"):
        jvm_parser.enable(spark, "fast")
    assert jvm_parser.enable(spark, "sql") is False
    jar = jvm_parser.build_jar(str(tmp_path / "cache"))
    assert jar.is_file() and jvm_parser.build_jar(str(tmp_path / "cache")) == jar  # cached by hash
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [jar.name]  # no partial file left

    def unloadable(session):
        raise RuntimeError("class not found")

    monkeypatch.setattr(jvm_parser, "_registered", lambda session: False)
    monkeypatch.setattr(jvm_parser, "_register", unloadable)
    monkeypatch.setattr(jvm_parser, "find_javac", lambda: None)
    empty = str(tmp_path / "empty-cache")
    with pytest.raises(RuntimeError, match="features.parser=jvm.*no javac"):
        jvm_parser.enable(spark, "jvm", empty)
    with caplog.at_level(logging.WARNING, logger=jvm_parser.__name__):
        assert jvm_parser.enable(spark, "auto", empty) is False
    assert "no javac" in caplog.text and "SQL parser" in caplog.text
    monkeypatch.undo()

    broken = tmp_path / "java" / "AliccpLine.java"
    broken.parent.mkdir()
    broken.write_text("package cvrspark.data; class AliccpLine { int x = ; }")
    monkeypatch.setattr(jvm_parser, "SOURCE", broken)
    with pytest.raises(RuntimeError, match="(?s)javac could not compile.*error: illegal start"):
        jvm_parser.build_jar(empty)


def test_field_names_outside_letters_digits_underscore_are_refused():
    """A field name is spliced into SQL text and into the JVM parser's spec: one check
    (fields.safe_name) refuses any other character in both."""
    from cvr_spark.data import jvm_parser
    from cvr_spark.data.aliccp_raw import raw_field_columns
    from cvr_spark.data.fields import FieldInfo

    good = [FieldInfo("109_14", "user", True), FieldInfo("205", "item")]
    assert jvm_parser.spec(5, good) == "5;205;109_14"
    for bad in ("a,b", "a;b", "a'b", "a`b", ""):
        fields = [FieldInfo(bad, "context")]
        with pytest.raises(ValueError, match="letters, digits or '_'"):
            jvm_parser.spec(5, fields)
        with pytest.raises(ValueError, match="letters, digits or '_'"):
            raw_field_columns(fields)
