"""Source readers on the real fixtures and the hand-made raw Ali-CCP fixture.

Every read is checked for the row accounting invariant: per input split, data lines read ==
canonical rows + rejected rows. Expected numbers come from reading the files with plain
Python (csv), never from the reader under test.
"""
from __future__ import annotations

import csv
import shutil
from collections import Counter
from pathlib import Path
from typing import Optional

import pytest
from pyspark.sql import functions as F

from cvr_spark.data.fields import AITM18, FULL
from cvr_spark.data.sources import REJECT_REASONS, SAMPLE_ID_OFFSET, SourceData, read_source

RAW = Path(__file__).resolve().parent / "data" / "aliccp_raw"
AITM_HEADER = ["click", "purchase", *AITM18]


def accounting(data: SourceData) -> tuple[dict, Counter, dict]:
    """(rows and label sums per split, rejects per (split, reason), input rows), in two jobs;
    asserts the invariant and that every reason is a declared one."""
    null = F.lit(None).cast("string")
    frames = [getattr(data, s).select(F.lit(s).alias("split"), null.alias("reason"), "click",
                                      "conversion") for s in ("train", "valid", "test")
              if getattr(data, s) is not None]
    frames.append(data.rejects.select(F.col("input_split").alias("split"), "reason",
                                      F.lit(0).alias("click"), F.lit(0).alias("conversion")))
    union = frames[0]
    for frame in frames[1:]:
        union = union.unionByName(frame)
    rows, rejects = {}, Counter()
    for r in union.groupBy("split", "reason").agg(F.count(F.lit(1)).alias("n"), F.sum("click").alias(
            "clicks"), F.sum("conversion").alias("conversions")).collect():
        if r["reason"] is None:
            rows[r["split"]] = (r["n"], r["clicks"], r["conversions"])
        else:
            rejects[(r["split"], r["reason"])] = r["n"]
    inputs = data.input_rows()
    assert set(inputs) == set(data.source_files)
    for split, n in inputs.items():
        kept = rows.get(split, (0, 0, 0))[0]
        assert n == kept + sum(v for (s, _), v in rejects.items() if s == split), split
    assert {reason for _, reason in rejects} <= set(REJECT_REASONS)
    return rows, rejects, inputs


def csv_rows(path: Path, header: bool) -> list[list[str]]:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[1:] if header else rows


def write(path: Path, lines: list[str]) -> Path:
    path.write_bytes(("\n".join(lines) + "\n").encode())
    return path


# ------------------------------------------------------------------ raw Ali-CCP


@pytest.mark.parametrize("parser", ["jvm", "sql"])
def test_raw_fixture_exact_rows_and_rejects(spark, parser: str) -> None:
    data = read_source(spark, "aliccp-raw", str(RAW), fields="full", parser=parser)
    assert data.parser == parser
    assert [f.name for f in data.fields] == FULL
    assert [f.name for f in data.fields if f.multi] == ["109_14", "110_14", "127_14", "150_14"]
    assert data.train.columns == ["sample_id", "click", "conversion", *FULL, "_split_key", "_file_index"]
    assert dict(data.train.dtypes)["109_14"] == "array<string>"
    assert dict(data.train.dtypes)["sample_id"] == "bigint"
    rows = {r["sample_id"]: r.asDict() for r in data.train.unionByName(data.test).collect()}
    test_id = SAMPLE_ID_OFFSET["test"] + 1
    assert sorted(rows) == [1, 2, 3, 4, test_id]
    r1, r2, r3, r4 = rows[1], rows[2], rows[3], rows[4]
    assert (r1["click"], r1["conversion"]) == (1, 1)
    assert (r1["101"], r1["121"], r1["124"], r1["122"]) == ("1001", "1101", "1201", None)
    assert (r1["205"], r1["206"], r1["210"], r1["508"], r1["207"]) == ("3001", "3101", "3201", "4001", None)
    assert (r1["109_14"], r1["150_14"], r1["110_14"]) == (["2001", "2002"], ["2101"], [])
    assert (r2["101"], r2["122"], r2["205"], r2["121"], r2["109_14"]) == ("1002", "1301", "3002", None, [])
    assert (r3["click"], r3["101"], r3["205"], r3["109_14"]) == (1, "1001", None, ["2001", "2002"])
    assert (r4["101"], r4["109_14"]) == ("9999", ["2003", "2001", "2002"])
    t = rows[test_id]
    assert (t["click"], t["101"], t["127_14"], t["205"], t["109_14"]) == (1, "7001", ["7101"], "8001", [])

    collected = data.rejects.collect()
    rejects = {(r["line"].split(",")[0], r["reason"], r["input_split"]) for r in collected}
    assert rejects == {
        ("5", "conversion_without_click", "train"), ("6", "missing_common_key", "train"),
        ("7", "malformed_feature", "train"), ("8", "bad_column_count", "train"),
        ("9", "bad_label", "train"), ("10", "feature_count_mismatch", "train"),
        ("abc", "bad_sample_id", "train"), ("12", "duplicate_sample_id", "train"),
        ("13", "malformed_common_feature", "train"), ("14", "duplicate_common_key", "train"),
        ("15", "malformed_common_feature", "train"), ("16", "malformed_feature", "train"),
        ("2", "conversion_without_click", "test")}
    # The invariant from what was collected above (one job fewer than accounting()).
    inputs = data.input_rows()
    kept = Counter("test" if sid >= SAMPLE_ID_OFFSET["test"] else "train" for sid in rows)
    rejected = Counter(r["input_split"] for r in collected)
    assert inputs == {"train": 17, "test": 2}
    assert all(inputs[s] == kept[s] + rejected[s] for s in inputs)
    raw_line = next(r for r in collected if r["line"].startswith("16,"))
    assert raw_line["line"] == "16,1,0,ck1,1,205\x023013\x03abc"
    assert raw_line["source_file"].endswith("sample_skeleton_train.csv")


def test_raw_common_join_broadcast_or_not_same_rows(spark, monkeypatch) -> None:
    """A common-features file above BROADCAST_COMMON_MAX_BYTES is joined without the hint
    (sort-merge join): the parsed rows and reasons are the same as with the broadcast."""
    import cvr_spark.data.sources as sources

    def parsed_rows() -> list[tuple]:
        data = read_source(spark, "aliccp-raw", str(RAW), fields="full")
        cols = ["_raw_id", "_reason", "input_split", *FULL]
        return sorted((tuple(str(v) for v in r) for r in data.parsed.select(*cols).collect()))

    def hinted(data) -> bool:
        """The common join is a broadcast (the duplicate-id join always is: no sort-merge join)."""
        plan = data.parsed._jdf.queryExecution().executedPlan().toString()
        return "BroadcastHashJoin" in plan and "SortMergeJoin" not in plan

    assert hinted(read_source(spark, "aliccp-raw", str(RAW), fields="full"))
    broadcast = parsed_rows()
    monkeypatch.setattr(sources, "BROADCAST_COMMON_MAX_BYTES", -1)
    spark.conf.set("spark.sql.autoBroadcastJoinThreshold", "-1")
    try:
        assert not hinted(read_source(spark, "aliccp-raw", str(RAW), fields="full"))
        assert parsed_rows() == broadcast
    finally:
        spark.conf.unset("spark.sql.autoBroadcastJoinThreshold")
    assert len(broadcast) == 19  # every data line of the train and test skeletons


def test_raw_aitm18_preset_and_optional_test_pair(spark, tmp_path: Path) -> None:
    for name in ("sample_skeleton_train.csv", "common_features_train.csv"):
        shutil.copy(RAW / name, tmp_path / name)
    data = read_source(spark, "aliccp-raw", str(tmp_path))
    assert data.test is None and data.valid is None and list(data.source_files) == ["train"]
    assert data.train.columns == ["sample_id", "click", "conversion", *AITM18, "_split_key", "_file_index"]
    assert all(not f.multi for f in data.fields)
    row = data.train.filter(F.col("sample_id") == 1).first()
    assert (row["101"], row["205"], row["508"]) == ("1001", "3001", "4001")


def test_raw_missing_files_raise_clear_errors(spark, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        read_source(spark, "aliccp-raw", str(tmp_path / "does_not_exist"))
    shutil.copy(RAW / "sample_skeleton_train.csv", tmp_path / "sample_skeleton_train.csv")
    with pytest.raises(FileNotFoundError, match="common_features_train.csv"):
        read_source(spark, "aliccp-raw", str(tmp_path))
    shutil.copy(RAW / "common_features_train.csv", tmp_path / "common_features_train.csv")
    shutil.copy(RAW / "sample_skeleton_test.csv", tmp_path / "sample_skeleton_test.csv")
    with pytest.raises(FileNotFoundError, match="common_features_test.csv"):
        read_source(spark, "aliccp-raw", str(tmp_path))
    with pytest.raises(ValueError, match="unknown field preset"):
        read_source(spark, "aliccp-raw", str(RAW), fields="nope")
    with pytest.raises(ValueError, match="unknown source"):
        read_source(spark, "criteo", str(RAW))


# ------------------------------------------------------------------ AITM CSV


def test_aitm_fixture_headerless_test_and_invalid_rows(spark, shared_fixtures: Path) -> None:
    folder = shared_fixtures / "PaddleRec" / "aitm"
    data = read_source(spark, "aitm-csv", str(folder))
    assert [f.name for f in data.fields] == AITM18
    assert data.train.columns == ["sample_id", "click", "conversion", *AITM18, "_split_key", "_file_index"]
    kept, rejects, inputs = accounting(data)
    for split, header in (("train", True), ("test", False)):
        rows = csv_rows(folder / f"{split}.csv", header)
        invalid = sum(r[0] == "0" and r[1] == "1" for r in rows)
        assert invalid > 0  # the fixture's documented click=0/purchase=1 rows
        assert inputs[split] == len(rows)
        assert {k: v for k, v in rejects.items() if k[0] == split} == {
            (split, "conversion_without_click"): invalid}
        assert kept[split] == (len(rows) - invalid, sum(r[0] == "1" for r in rows),
                               sum(r[0] == "1" and r[1] == "1" for r in rows))
    rows = csv_rows(folder / "train.csv", True)
    nulls = data.train.filter(F.col("126").isNull()).count()
    assert nulls == sum(r[7] == "0" for r in rows if not (r[0] == "0" and r[1] == "1")) > 0


def test_ddpo_train_with_explicit_test_input(spark, shared_fixtures: Path) -> None:
    test_file = shared_fixtures / "PaddleRec" / "aitm" / "test.csv"
    data = read_source(spark, "aitm-csv", str(shared_fixtures / "ddpo-paddle" / "train.csv"),
                       test_input=str(test_file))
    assert data.source_files == {"train": [str(shared_fixtures / "ddpo-paddle" / "train.csv")],
                                 "test": [str(test_file)]}
    kept, rejects, inputs = accounting(data)
    assert inputs == {"train": 1000, "test": 50}
    assert kept["train"] == (1000, 39, 0)  # fixture README: 39 clicks, 0 conversions
    assert not any(s == "train" for s, _ in rejects)


def test_aitm_bad_inputs_exact_accounting(spark, tmp_path: Path) -> None:
    good = ",".join(["5"] * 18)
    zeros = ",".join(["0"] * 17 + ["7"])
    write(tmp_path / "train.csv", [
        ",".join(AITM_HEADER), f"1,1,{good}", f"0,0,{zeros}", f"0,1,{good}", f"2,0,{good}",
        "1,0,5,6", "", f"1,0,{good}\r", f"x,0,{good}"])
    write(tmp_path / "test.csv", [f"0,0,{good}", f"1,1,{good},9"])
    data = read_source(spark, "aitm-csv", str(tmp_path))
    kept, rejects, inputs = accounting(data)
    assert inputs == {"train": 8, "test": 2}
    assert kept == {"train": (3, 2, 1), "test": (1, 0, 0)}
    assert rejects == Counter({("train", "conversion_without_click"): 1, ("train", "bad_label"): 2,
                               ("train", "bad_column_count"): 2, ("test", "bad_column_count"): 1})
    zero_row = data.train.filter(F.col("click") == 0).first()
    assert [zero_row[f] for f in AITM18] == [None] * 17 + ["7"]
    lines = {r["line"] for r in data.rejects.collect()}
    assert {"", "1,0,5,6", f"x,0,{good}", f"1,1,{good},9"} <= lines


def test_csv_missing_file_and_header_column_errors(spark, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no train file"):
        read_source(spark, "aitm-csv", str(tmp_path))
    write(tmp_path / "train.csv", [",".join(AITM_HEADER), "0,0," + ",".join(["1"] * 18)])
    write(tmp_path / "test.csv", [",".join(AITM_HEADER[:-1]), "0,0," + ",".join(["1"] * 17)])
    with pytest.raises(ValueError, match=r"test\.csv.*no column '301'"):
        read_source(spark, "aitm-csv", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="missing_test.csv"):
        read_source(spark, "aitm-csv", str(tmp_path / "train.csv"),
                    test_input=str(tmp_path / "missing_test.csv"))


# ------------------------------------------------------------------ torch-rechub CSV


def test_rechub_fixture_three_splits(spark, shared_fixtures: Path) -> None:
    folder = shared_fixtures / "torch-rechub" / "ali-ccp"
    data = read_source(spark, "rechub-csv", str(folder))
    assert set(data.source_files) == {"train", "valid", "test"}
    header = csv_rows(folder / "ali_ccp_train_sample.csv", False)[0]
    assert [f.name for f in data.fields] == header[2:25]
    assert data.dense_fields == header[25:] and len(data.dense_fields) == 8
    assert dict(data.train.dtypes)["D508"] == "double"
    assert dict(data.train.dtypes)["150_14"] == "string"
    kept, rejects, inputs = accounting(data)
    for split, name in (("train", "train"), ("valid", "val"), ("test", "test")):
        rows = csv_rows(folder / f"ali_ccp_{name}_sample.csv", True)
        assert inputs[split] == len(rows) and kept[split][0] == len(rows)
        assert kept[split][1:] == (sum(r[0] == "1" for r in rows), sum(r[1] == "1" for r in rows))
    assert not rejects
    ids = data.train.unionByName(data.valid).unionByName(data.test).select("sample_id")
    assert ids.distinct().count() == 200
    first = csv_rows(folder / "ali_ccp_val_sample.csv", True)[0]
    row = data.valid.orderBy("sample_id").first()
    assert [row[c] for c in header[2:25]] == first[2:25]  # "0" is a real re-encoded id here
    assert [row[c] for c in header[25:]] == [float(v) for v in first[25:]]


def test_rechub_bad_dense_and_missing_header_column(spark, shared_fixtures: Path,
                                                    tmp_path: Path) -> None:
    source = shared_fixtures / "torch-rechub" / "ali-ccp" / "ali_ccp_train_sample.csv"
    header, first = source.read_text().splitlines()[:2]
    write(tmp_path / "ali_ccp_train_x.csv", [header, first, first[:first.rindex(",")] + ",abc",
                                             first[:first.rindex(",")] + ","])
    kept, rejects, inputs = accounting(read_source(spark, "rechub-csv", str(tmp_path)))
    assert (inputs, kept["train"][0]) == ({"train": 3}, 1)
    assert rejects == Counter({("train", "bad_dense_value"): 2})
    bad = tmp_path / "no_d853.csv"
    write(bad, [header[:header.rindex(",")], first[:first.rindex(",")]])
    with pytest.raises(ValueError, match=r"no_d853\.csv.*no column 'D853'"):
        read_source(spark, "rechub-csv", str(bad))


# ------------------------------------------------------------------ PaddleRec joined text


def test_paddle_joined_fixture_multi_valued(spark, shared_fixtures: Path) -> None:
    folder = shared_fixtures / "PaddleRec" / "esmm"
    data = read_source(spark, "paddle-joined", str(folder), fields="full")
    kept, rejects, inputs = accounting(data)
    assert inputs == {"train": 10, "test": 10} and not rejects
    lines = (folder / "train_small.txt").read_text().splitlines()
    tokens = [t.split(":") for line in lines for t in line.split(",")[3:]]
    total = data.train.select(*[F.sum(F.size(f)).alias(f) for f in
                                ("109_14", "110_14", "127_14", "150_14")]).first()
    for field in ("109_14", "110_14", "127_14", "150_14"):
        assert total[field] == sum(f == field for f, _ in tokens) > 0
    ids = data.train.unionByName(data.test).select("sample_id").distinct().count()
    assert ids == 20  # both files number their rows 1..10
    first = lines[0].split(",")
    row = data.train.orderBy("sample_id").first()
    assert row["210"] == next(t.split(":")[1] for t in first[3:] if t.startswith("210:"))
    for field in ("205", "509", "853"):
        assert row[field] == next((t.split(":")[1] for t in first[3:] if t.startswith(field + ":")), None)
    assert (row["click"], row["conversion"]) == (int(first[1]), int(first[2]))


def test_paddle_joined_bad_lines(spark, tmp_path: Path) -> None:
    path = write(tmp_path / "part.txt", [
        "1,1,1,101:5,205:6,150_14:7,150_14:8", "2,0,0,101:5,205", "3,x,0,101:5",
        "abc,0,0,101:5", "4,0", "5,0,1,101:5", "6,0,0"])
    data = read_source(spark, "paddle-joined", str(path), fields="full")
    kept, rejects, inputs = accounting(data)
    assert inputs == {"train": 7} and kept["train"] == (2, 1, 1)
    assert rejects == Counter({("train", r): 1 for r in (
        "malformed_feature", "bad_label", "bad_sample_id", "bad_column_count",
        "conversion_without_click")})
    row = data.train.filter(F.col("click") == 1).first()
    assert (row["101"], row["205"], row["150_14"], row["109_14"]) == ("5", "6", ["7", "8"], [])


# ------------------------------------------------------------------ AliExpress CSV


@pytest.mark.parametrize("folder,train,test", [
    ("torch-rechub/aliexpress", "aliexpress_train_sample.csv", "aliexpress_test_sample.csv"),
    ("FuxiCTR/tiny_mtl", "train.csv", "test.csv")])
def test_aliexpress_fixtures(spark, shared_fixtures: Path, folder: str, train: str,
                             test: str) -> None:
    data = read_source(spark, "aliexpress-csv", str(shared_fixtures / folder))
    assert [f.name for f in data.fields] == [f"categorical_{i}" for i in range(1, 17)]
    assert {f.group for f in data.fields} == {"context"}
    assert data.dense_fields == [f"numerical_{i}" for i in range(1, 64)]
    kept, rejects, inputs = accounting(data)
    for split, name in (("train", train), ("test", test)):
        rows = csv_rows(shared_fixtures / folder / name, True)
        invalid = sum(r[-2] == "0" and r[-1] == "1" for r in rows)
        assert inputs[split] == len(rows)
        assert kept[split] == (len(rows) - invalid, sum(r[-2] == "1" for r in rows),
                               sum(r[-2] == "1" and r[-1] == "1" for r in rows))
        assert rejects[(split, "conversion_without_click")] == invalid


# ------------------------------------------------------------------ CSV headers, encoding, split keys

GOOD = ",".join(["5"] * 18)


def test_csv_repeated_header_lines_are_counted_and_rejected(spark, tmp_path: Path) -> None:
    """Two concatenated CSVs: the first line of a file is its header, every later copy of it is
    a data line rejected as ``repeated_header`` (kept with its raw text, counted as rows in)."""
    header = ",".join(AITM_HEADER)
    train = write(tmp_path / "train.csv", [header, f"1,1,{GOOD}", f"0,0,{GOOD}", header,
                                           f"1,0,{GOOD}", f"0,0,{GOOD}", header])
    test = write(tmp_path / "test.csv", [header, f"1,0,{GOOD}", header])
    data = read_source(spark, "aitm-csv", str(tmp_path))
    kept, rejects, inputs = accounting(data)
    lines = {p: p.read_text().splitlines() for p in (train, test)}
    repeats = {p: sum(line == header for line in ls[1:]) for p, ls in lines.items()}
    assert repeats == {train: 2, test: 1}
    assert inputs == {"train": len(lines[train]) - 1, "test": len(lines[test]) - 1}
    assert inputs == {"train": 6, "test": 2}
    assert rejects == Counter({("train", "repeated_header"): 2, ("test", "repeated_header"): 1})
    assert kept == {"train": (4, 2, 1), "test": (1, 1, 0)}
    got = sorted((r["source_file"], r["line"]) for r in data.rejects.collect())
    assert got == [(str(test), header), (str(train), header), (str(train), header)]


def test_csv_header_is_found_in_a_file_read_as_many_splits(spark, tmp_path: Path) -> None:
    """A file Spark reads in many splits (here ~40-byte ones): the header probe reads the split
    at byte 0, so the header is recognised and counted once, and every data line is kept."""
    header = ",".join(AITM_HEADER)
    write(tmp_path / "train.csv", [header] + [f"{i % 2},0,{GOOD}" for i in range(60)])
    write(tmp_path / "test.csv", [header, f"1,0,{GOOD}"])
    old = spark.conf.get("spark.sql.files.maxPartitionBytes")
    spark.conf.set("spark.sql.files.maxPartitionBytes", "40")
    try:
        assert spark.read.text(str(tmp_path / "train.csv")).rdd.getNumPartitions() > 10
        kept, rejects, inputs = accounting(read_source(spark, "aitm-csv", str(tmp_path)))
    finally:
        spark.conf.set("spark.sql.files.maxPartitionBytes", old)
    assert inputs == {"train": 60, "test": 1} and not rejects
    assert kept["train"] == (60, 30, 0)


def test_csv_bad_first_line_of_a_headerless_file_is_a_reject(spark, shared_fixtures: Path,
                                                            tmp_path: Path) -> None:
    """A first line that does not look like a header is data: a bad one is rejected like the
    same line anywhere else, instead of failing the job as a header without 'click'."""
    write(tmp_path / "train.csv", [",".join(AITM_HEADER), f"1,1,{GOOD}", f"0,0,{GOOD}"])
    write(tmp_path / "test.csv", [f"x,0,{GOOD}", f"1,1,{GOOD}", f"x,0,{GOOD}"])
    kept, rejects, inputs = accounting(read_source(spark, "aitm-csv", str(tmp_path)))
    assert inputs == {"train": 2, "test": 3} and kept["test"] == (1, 1, 1)
    assert rejects == Counter({("test", "bad_label"): 2})

    blank = write(tmp_path / "blank_first.csv", ["", f"1,0,{GOOD}", f"2,0,{GOOD}"])
    kept, rejects, inputs = accounting(read_source(spark, "aitm-csv", str(blank)))
    assert inputs == {"train": 3} and kept["train"] == (1, 1, 0)
    assert rejects == Counter({("train", "bad_column_count"): 1, ("train", "bad_label"): 1})

    # rechub: a headerless val file whose first line has a non-numeric label
    source = shared_fixtures / "torch-rechub" / "ali-ccp" / "ali_ccp_train_sample.csv"
    header, first = source.read_text().splitlines()[:2]
    (tmp_path / "rechub").mkdir()
    write(tmp_path / "rechub" / "ali_ccp_train_x.csv", [header, first])
    write(tmp_path / "rechub" / "ali_ccp_val_x.csv", ["?" + first[1:], first])
    kept, rejects, inputs = accounting(read_source(spark, "rechub-csv", str(tmp_path / "rechub")))
    assert inputs == {"train": 1, "valid": 2} and rejects == Counter({("valid", "bad_label"): 1})


def test_csv_header_like_first_lines_still_need_every_column(spark, tmp_path: Path) -> None:
    """Only a line that looks like a header is one (it names a label or another known
    non-numeric column, or has no number at all); such a line without a required column is
    a clear error naming the file."""
    rows = [f"1,0,{GOOD}"]
    for name, head in (("capital.csv", ["Click", "Purchase", *AITM18]),
                       ("renamed.csv", ["clk", "buy", *[f"f{i}" for i in range(18)]]),
                       ("no_click.csv", ["purchase", *AITM18])):
        path = write(tmp_path / name, [",".join(head), *rows])
        with pytest.raises(ValueError, match=rf"{name}.*header has no column 'click'"):
            read_source(spark, "aitm-csv", str(path))


def test_csv_split_without_data_lines_is_an_error_naming_its_files(spark, shared_fixtures: Path,
                                                                   tmp_path: Path) -> None:
    """An empty or header-only file (the only file of its split) is an error naming it, raised
    by the reader, not the feature job's "read no input rows" without a file name."""
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    header_only = write(tmp_path / "header_only.csv", [",".join(AITM_HEADER)])
    for path in (empty, header_only):
        name = path.name
        with pytest.raises(ValueError, match=rf"'train' has no data lines.*{name}"):
            read_source(spark, "aitm-csv", str(path)).input_rows()
    folder = tmp_path / "rechub"
    folder.mkdir()
    for name in ("train", "val", "test"):
        src = shared_fixtures / "torch-rechub" / "ali-ccp" / f"ali_ccp_{name}_sample.csv"
        lines = src.read_text().splitlines()
        write(folder / src.name, lines[:1] if name == "val" else lines)
    with pytest.raises(ValueError, match=r"'valid' has no data lines.*ali_ccp_val_sample\.csv"):
        read_source(spark, "rechub-csv", str(folder)).input_rows()


def test_csv_invalid_utf8_lines_are_rejected_with_the_replacement_text(spark,
                                                                       tmp_path: Path) -> None:
    """Bytes that are not UTF-8 (Spark keeps them in the string) are ``invalid_utf8`` rejects;
    the stored raw line holds U+FFFD where the bad bytes were. A real U+FFFD (valid UTF-8) is
    ordinary text."""
    header = ",".join(AITM_HEADER).encode()
    good = GOOD.encode()
    raw = [header, b"1,1," + good, b"1,0,5\xff," + good[2:], b"0,0," + good[:-1] + b"\xfe",
           "0,0,5\ufffd,".encode() + good[2:], b"0,0," + good]
    path = tmp_path / "train.csv"
    path.write_bytes(b"\n".join(raw) + b"\n")
    data = read_source(spark, "aitm-csv", str(path))
    kept, rejects, inputs = accounting(data)
    assert inputs == {"train": 5} and kept["train"] == (3, 1, 1)
    assert rejects == Counter({("train", "invalid_utf8"): 2})
    stored = sorted(r["line"] for r in data.rejects.collect())
    assert stored == sorted(b.decode("utf-8", "replace") for b in raw[2:4])
    assert all("\ufffd" in line for line in stored)


def _keys_by_line(spark, folder: Path,
                  max_partition_bytes: Optional[str]) -> tuple[dict, dict, int]:
    """(raw line -> {_split_key}, raw line -> {sample_id}, partitions of the train scan) of the
    canonical rows of one read, with ``spark.sql.files.maxPartitionBytes`` set for it."""
    key = "spark.sql.files.maxPartitionBytes"
    if max_partition_bytes:
        spark.conf.set(key, max_partition_bytes)
    try:
        data = read_source(spark, "aitm-csv", str(folder))
        canonical = data.train.unionByName(data.test).select("sample_id", "_split_key")
        lines = data.parsed.filter(F.col("_reason").isNull()).select("_line", "sample_id")
        rows = canonical.join(lines, "sample_id").collect()  # one job: one partitioning
        partitions = spark.read.text(str(folder / "train.csv")).rdd.getNumPartitions()
    finally:
        spark.conf.unset(key)
    keys, ids = {}, {}
    for r in rows:
        keys.setdefault(r["_line"], set()).add(r["_split_key"])
        ids.setdefault(r["_line"], set()).add(r["sample_id"])
    return keys, ids, partitions


def test_split_key_of_generated_ids_does_not_depend_on_partitioning(spark,
                                                                     shared_fixtures: Path) -> None:
    """``sample_id`` of a source without ids encodes the partition; ``_split_key`` (what the
    split hashes) is xxhash64(file base name, raw line), the same under any partitioning."""
    folder = shared_fixtures / "PaddleRec" / "aitm"
    one, one_ids, n_one = _keys_by_line(spark, folder, None)
    many, many_ids, n_many = _keys_by_line(spark, folder, "256")
    assert (n_one, n_many > 8) == (1, True)
    assert one_ids != many_ids  # the partitioning does change the generated sample ids
    assert one == many and all(len(k) == 1 for k in one.values())
    valid = {name: [line for line in (folder / name).read_text().splitlines()
                    if not line.startswith(("0,1,", "click"))] for name in ("train.csv", "test.csv")}
    assert set(one) == set(valid["train.csv"]) | set(valid["test.csv"])
    for name in ("train.csv", "test.csv"):  # the key's definition, computed apart from the reader
        line = valid[name][0]
        assert one[line] == {spark.range(1).select(F.xxhash64(F.lit(name), F.lit(line))).first()[0]}
    dtypes = dict(read_source(spark, "aitm-csv", str(folder)).train.dtypes)
    assert dtypes["_split_key"] == "bigint"


def test_split_key_of_raw_ids_is_the_raw_id(spark) -> None:
    """Raw Ali-CCP: ``_split_key`` is the raw id (the split of raw data does not change)."""
    data = read_source(spark, "aliccp-raw", str(RAW), fields="full")
    for split in ("train", "test"):
        rows = getattr(data, split).select("sample_id", "_split_key").collect()
        assert rows and all(r["_split_key"] == r["sample_id"] - SAMPLE_ID_OFFSET[split]
                            for r in rows)
    assert sorted(r["_split_key"] for r in data.test.collect()) == [1]
