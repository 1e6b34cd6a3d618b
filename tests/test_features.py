"""The feature job: stages checked against independent Python computations, and whole runs
(real Spark, real Delta) for publishing, versions, accounting, failures and the manifest."""
from __future__ import annotations

import csv
import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pyarrow.parquet as pq
import pytest
from pyspark.sql import functions as F

from cvr_spark.data import features as fm
from cvr_spark.data.features import (
    AccountingError, FeaturesConfig, RejectBoundError, add_keys, add_labels, assign_split,
    build_features, build_vocab, canonical_frame, check_accounting, encode, vocab_sizes,
)
from cvr_spark.data.fields import FieldInfo
from cvr_spark.models.base import FeatureSpec
from cvr_spark.tables import read_table
from cvr_spark.train.loader import split_files

FIELDS = [FieldInfo("101", "user"), FieldInfo("205", "item"), FieldInfo("301", "context"),
          FieldInfo("150_14", "user", multi=True)]
SCHEMA = ("sample_id long, click int, conversion int, `101` string, `205` string, `301` string, "
          "`150_14` array<string>, D1 double")
REJECT_SCHEMA = "source_file string, line long, reason string, input_split string"


@dataclass
class FakeSource:
    """Same shape as cvr_spark.data.sources.SourceData (what the feature job reads)."""

    train: object
    valid: Optional[object]
    test: Optional[object]
    rejects: object
    fields: list = field(default_factory=lambda: list(FIELDS))
    dense_fields: list = field(default_factory=lambda: ["D1"])
    source_files: dict = field(default_factory=dict)
    rows: dict = field(default_factory=dict)

    def input_rows(self) -> dict[str, int]:
        return dict(self.rows)


def make_rows(n: int, seed: int, first_id: int, id_range: int) -> list[tuple]:
    """Skewed ids (so min_count matters), nulls, arrays with null elements and null arrays."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        click = int(rng.random() < 0.3)
        conv = int(click and rng.random() < 0.4)
        user = str(int(rng.paretovariate(1.2)) % id_range)
        item = None if i % 9 == 4 else f"i{int(rng.paretovariate(1.0)) % id_range}"
        ctx = None if i % 5 == 0 else str(rng.randint(0, 3))
        hist = None if i % 13 == 6 else [None if rng.random() < 0.1 else str(rng.randint(0, id_range))
                                         for _ in range(rng.randint(0, 4))]
        rows.append((first_id + i, click, conv, user, item, ctx, hist, rng.random()))
    return rows


def make_source(spark, n_train: int = 400, n_test: int = 150, rejects: int = 2,
                reasons: tuple[str, ...] = ("conversion_without_click", "unparseable")) -> FakeSource:
    train = spark.createDataFrame(make_rows(n_train, 1, 0, 30), SCHEMA)
    test = spark.createDataFrame(make_rows(n_test, 2, 100_000, 60), SCHEMA)  # ids unseen in train
    rej = [("train.csv", 10 + i, reasons[i % len(reasons)], "train" if i % 2 == 0 else "test")
           for i in range(rejects)]
    n_rej = Counter(r[3] for r in rej)
    return FakeSource(train, None, test, spark.createDataFrame(rej, REJECT_SCHEMA),
                      source_files={"train": ["train.csv"], "test": ["test.csv"]},
                      rows={"train": n_train + n_rej["train"], "test": n_test + n_rej["test"]})


def python_vocab(rows: list[tuple], min_count: int) -> dict[str, dict[str, tuple[int, int]]]:
    """field -> raw id -> (index, count), computed with Counter: the independent reference."""
    cols = {"101": 3, "205": 4, "301": 5, "150_14": 6}
    out = {}
    for name, j in cols.items():
        values = [x for r in rows for x in ((r[j] or []) if name == "150_14" else [r[j]]) if x is not None]
        kept = sorted(((c, v) for v, c in Counter(values).items() if c >= min_count), key=lambda t: (-t[0], t[1]))
        out[name] = {v: (i + 1, c) for i, (c, v) in enumerate(kept)}
    return out


# ---------------------------------------------------------------- stages


def test_vocab_matches_counter_and_encoding_is_index_zero_for_rare_unseen_missing(spark):
    src = make_source(spark, rejects=0)
    min_count = 3
    vocab = build_vocab(src.train, FIELDS, min_count).cache()
    ref = python_vocab(make_rows(400, 1, 0, 30), min_count)
    got = {}
    for r in vocab.collect():
        got.setdefault(r["field"], {})[r["raw_id"]] = (r["index"], r["count"])
    assert got == {k: v for k, v in ref.items() if v}
    sizes = vocab_sizes(vocab, FIELDS)
    assert sizes == {k: len(v) + 1 for k, v in ref.items()}
    assert any(c < min_count for c in Counter(r[3] for r in make_rows(400, 1, 0, 30)).values())  # filter bites

    single = sorted(sizes[f.name] for f in FIELDS if not f.multi)
    # every single-valued field's vocabulary broadcast, none (Spark picks the joins), a mix
    for limit in (1_000_000, 0, single[len(single) // 2]):
        check_encoding(encode(canonical_frame(src), vocab, FIELDS, sizes, limit), ref)
    vocab.unpersist()


def check_encoding(enc, ref):
    """The encoded rows of `make_source` against the Python vocabulary `ref`."""
    types = dict(enc.dtypes)
    assert types["101"] == "int" and types["150_14"] == "array<int>"
    raw = {r[0]: r for r in make_rows(400, 1, 0, 30) + make_rows(150, 2, 100_000, 60)}
    encoded = enc.collect()
    assert len(encoded) == len(raw)
    for row in encoded:
        r = raw[row["sample_id"]]
        for name, j in (("101", 3), ("205", 4), ("301", 5)):
            assert row[name] == ref[name].get(r[j], (0, 0))[0], (name, r[j])
        expected = [ref["150_14"].get(x, (0, 0))[0] if x is not None else 0 for x in (r[6] or [])]
        assert row["150_14"] == expected
    test_rows = [row for row in encoded if row["sample_id"] >= 100_000]
    unseen = [row for row in test_rows if raw[row["sample_id"]][4] is not None
              and raw[row["sample_id"]][4] not in ref["205"]]
    assert unseen and all(row["205"] == 0 for row in unseen)
    missing = [row for row in encoded if raw[row["sample_id"]][5] is None]
    assert missing and all(row["301"] == 0 for row in missing)


@pytest.mark.parametrize("broadcast", [["f1", "f2"], [], ["f1"]])
def test_encoding_keeps_fields_apart_when_they_share_raw_ids(spark, broadcast):
    """The same raw id in two fields has each field's own index, whether the fields' vocabularies
    are broadcast, joined as Spark picks, or a mix."""
    vocab = spark.createDataFrame([("f1", "x", 1, 9), ("f2", "x", 2, 9), ("f2", "y", 1, 9)],
                                  "field string, raw_id string, index int, count long")
    df = spark.createDataFrame([(1, "x", "x"), (2, "y", "y"), (3, None, "z")], "sample_id long, f1 string, f2 string")
    out = fm._encode_singles(df, vocab, ["f1", "f2"], broadcast)
    assert out.columns == ["sample_id", "f1", "f2"]
    assert sorted(tuple(r) for r in out.collect()) == [(1, 1, 2), (2, 0, 1), (3, 0, 0)]


def test_labels(spark):
    df = spark.createDataFrame([(0, 0), (1, 0), (1, 1)], "click long, conversion long")
    rows = add_labels(df).collect()
    assert [(r.click, r.conversion, r.ctcvr, r.ctnocvr) for r in rows] == [(0, 0, 0, 0), (1, 0, 0, 1), (1, 1, 1, 0)]
    assert dict(add_labels(df).dtypes)["ctnocvr"] == "int"


def test_keys_hash_raw_values_and_are_null_when_missing(spark):
    df = spark.createDataFrame([("u1", "a"), (None, "a"), ("u1", None)], "`101` string, `205` string")
    rows = add_keys(df).collect()
    assert rows[0].user_key == rows[2].user_key is not None and rows[1].user_key is None
    assert rows[0].item_key == rows[1].item_key is not None and rows[2].item_key is None
    assert all(r.item_key is None for r in add_keys(df.drop("205")).collect())


def _split_frame(spark, n: int):
    return spark.range(n).selectExpr("id AS sample_id", "id AS t",
                                     "CASE WHEN id % 10 = 9 THEN 'test' ELSE 'train' END AS input_split")


def test_random_split_is_deterministic_seeded_and_partitioning_independent(spark):
    df = _split_frame(spark, 20_000)

    def valid_ids(frame, seed):
        return {r.sample_id for r in assign_split(frame, 0.1, seed).where("split = 'valid'").collect()}

    a = valid_ids(df, 7)
    assert a == valid_ids(df.repartition(7), 7) == valid_ids(df.coalesce(1).orderBy("t", ascending=False), 7)
    assert a != valid_ids(df, 8)
    assert abs(len(a) / 18_000 - 0.1) < 0.01
    counts = {r.split: r["count"] for r in assign_split(df, 0.1, 7).groupBy("split").count().collect()}
    assert counts["test"] == 2_000 and counts["train"] + counts["valid"] == 18_000
    assert all(r.input_split == "train" for r in assign_split(df, 0.1, 7).where("split = 'valid'").collect())


def test_split_column_uses_the_quantile_of_the_train_input(spark):
    df = _split_frame(spark, 1_000)
    out = assign_split(df, 0.2, 0, split_column="t").where("input_split = 'train'").collect()
    valid = [r.t for r in out if r.split == "valid"]
    train = [r.t for r in out if r.split == "train"]
    assert valid and max(train) < min(valid)  # a cut, not a random sample
    assert abs(len(valid) / len(out) - 0.2) < 0.01
    with pytest.raises(KeyError, match="split_column 'nope'"):
        assign_split(df, 0.2, 0, split_column="nope")


def test_source_valid_frame_is_used_as_valid_and_never_carved(spark, shared_fixtures, tmp_path):
    """The whole feature job on torch-rechub's sample, which has its own val file: that file is
    the valid split and nothing is carved out of train, even with valid_fraction=0.5 (a
    carve-out would move about half of the 100 train rows to valid)."""
    folder = shared_fixtures / "torch-rechub" / "ali-ccp"
    lines = {}
    for split, name in (("train", "train"), ("valid", "val"), ("test", "test")):
        with open(folder / f"ali_ccp_{name}_sample.csv", newline="") as fh:
            lines[split] = list(csv.reader(fh))[1:]  # data lines (each file has a header)
    invalid = {s: sum(r[0] == "0" and r[1] == "1" for r in rows) for s, rows in lines.items()}
    cfg = FeaturesConfig(source="rechub-csv", input=str(folder), output=str(tmp_path), format="parquet",
                         valid_fraction=0.5, min_count=1, rows_per_file=1000, seed=3)
    manifest = fm.run_features(spark, cfg)
    assert manifest["split"]["mode"] == "source" and manifest["split"]["valid_fraction"] == 0.0
    assert manifest["rows_in"] == {s: len(rows) for s, rows in lines.items()} == {
        "train": 100, "valid": 50, "test": 50}
    assert {s: a["rejects"] for s, a in manifest["accounting"].items()} == invalid
    assert manifest["rows"]["valid"] == len(lines["valid"])
    assert manifest["rows"]["train"] == len(lines["train"]) - invalid["train"]
    assert manifest["rows"]["test"] == len(lines["test"]) - invalid["test"]
    for split in ("train", "valid"):  # the very rows of each file, by their label sums
        kept = [r for r in lines[split] if not (r[0] == "0" and r[1] == "1")]
        assert manifest["label_rates"][split]["click"] == pytest.approx(
            sum(r[0] == "1" for r in kept) / len(kept)), split


def test_accounting_and_reject_bound_errors_name_the_numbers():
    assert check_accounting({"train": 5}, {"train": 4}, {"train": 1})["train"]["rejects"] == 1
    with pytest.raises(AccountingError, match="'rows_in': 5, 'features': 3, 'rejects': 1"):
        check_accounting({"train": 5}, {"train": 3}, {"train": 1})
    with pytest.raises(RejectBoundError, match=r"3 of 100 .*max_reject_fraction=0.01.*'bad_line': 2"):
        fm.check_reject_bound({"train": 100}, {"bad_line": 2, "x": 1}, 0.01)


def test_bad_fields_and_labels_are_clear_errors(spark):
    df = spark.createDataFrame([(1, 0, 1, "a")], "sample_id long, click int, conversion int, `101` string")
    with pytest.raises(KeyError, match="field column '205' missing"):
        build_vocab(df, [FieldInfo("205", "item")], 1)
    with pytest.raises(TypeError, match="'101' is string, expected array<string>"):
        build_vocab(df, [FieldInfo("101", "user", multi=True)], 1)
    table = add_labels(df).selectExpr("*", "'train' AS split", "'train' AS input_split")
    with pytest.raises(ValueError, match="1 rows of input split 'train' break the label contract"):
        fm.split_stats(table)


# ---------------------------------------------------------------- whole runs


def _cfg(out: Path, **kw) -> FeaturesConfig:
    return FeaturesConfig(source="fake", output=str(out), rows_per_file=100, seed=11, **kw)


@pytest.fixture(scope="module")
def delta_out(spark, tmp_path_factory) -> tuple[Path, dict, dict]:
    """Two runs into one folder: version 0 with min_count 2, version 1 with min_count 3."""
    out = tmp_path_factory.mktemp("features_delta")
    first = build_features(_cfg(out, min_count=2), make_source(spark))
    second = build_features(_cfg(out, min_count=3), make_source(spark))
    return out, first, second


def test_manifest_contract_and_feature_spec(delta_out):
    out, first, manifest = delta_out
    assert json.loads((out / "manifest.json").read_text()) == json.loads(json.dumps(manifest))
    ref = python_vocab(make_rows(400, 1, 0, 30), 3)
    assert manifest["fields"] == [{"name": f.name, "group": f.group, "multi": f.multi,
                                   "vocab_size": len(ref[f.name]) + 1} for f in FIELDS]
    spec = FeatureSpec.from_manifest(manifest)
    assert spec.sparse_fields == ("101", "205", "301") and spec.multi_fields == ("150_14",)
    assert spec.dense_fields == ("D1",) and spec.groups["205"] == "item"
    assert (manifest["user_key_field"], manifest["item_key_field"]) == ("101", "205")
    assert manifest["labels"] == ["click", "conversion", "ctcvr", "ctnocvr"]
    assert manifest["rows_in"] == {"train": 401, "test": 151}
    assert manifest["rejects"] == {"conversion_without_click": 1, "unparseable": 1}
    assert manifest["config"]["min_count"] == 3 and first["config"]["min_count"] == 2
    assert manifest["source_files"] == {"train": ["train.csv"], "test": ["test.csv"]}
    assert {k: v["version"] for k, v in manifest["tables"].items()} == {"features": 1, "vocab": 1, "rejects": 1}
    assert manifest["created_at"].endswith("+00:00") and manifest["split"]["mode"] == "random"


def test_exact_row_accounting_and_label_rates(spark, delta_out):
    out, _, manifest = delta_out
    feats = read_table(spark, out / "features", "delta", manifest["tables"]["features"]["version"]).collect()
    rejects = read_table(spark, out / "rejects", "delta", manifest["tables"]["rejects"]["version"]).collect()
    assert len({r.sample_id for r in feats}) == len(feats) == 550
    for split_in, n_in in manifest["rows_in"].items():
        n_feat = sum(1 for r in feats if (r.split == "test") == (split_in == "test"))
        n_rej = sum(1 for r in rejects if r.input_split == split_in)
        assert n_in == n_feat + n_rej, split_in
        assert manifest["accounting"][split_in] == {"rows_in": n_in, "features": n_feat, "rejects": n_rej}
    assert sorted((r.source_file, r.line, r.reason) for r in rejects) == [
        ("train.csv", "10", "conversion_without_click"), ("train.csv", "11", "unparseable")]
    for split in ("train", "valid", "test"):
        rows = [r for r in feats if r.split == split]
        assert manifest["rows"][split] == len(rows)
        assert manifest["label_rates"][split]["click"] == pytest.approx(sum(r.click for r in rows) / len(rows))
        assert manifest["label_rates"][split]["ctnocvr"] == pytest.approx(
            sum(r.click * (1 - r.conversion) for r in rows) / len(rows))
    assert sum(r.click for r in feats if r.split != "test") == sum(r[1] for r in make_rows(400, 1, 0, 30))


def test_delta_versions_schema_and_even_files(spark, delta_out):
    out, _, manifest = delta_out
    from deltalake import DeltaTable

    for name in ("features", "vocab", "rejects"):
        assert (out / name / "_delta_log").is_dir()
    v0 = read_table(spark, out / "vocab", "delta", version=0)
    ref2 = python_vocab(make_rows(400, 1, 0, 30), 2)
    assert v0.count() == sum(len(v) for v in ref2.values())  # version 0 (min_count 2) still readable
    assert read_table(spark, out / "vocab", "delta").count() == sum(
        f["vocab_size"] - 1 for f in manifest["fields"])
    types = dict(read_table(spark, out / "features", "delta").dtypes)
    assert {k: types[k] for k in ("sample_id", "101", "150_14", "D1", "click", "ctcvr", "user_key", "split")} == {
        "sample_id": "bigint", "101": "int", "150_14": "array<int>", "D1": "float", "click": "int",
        "ctcvr": "int", "user_key": "bigint", "split": "string"}
    features = DeltaTable(str(out / "features"))
    assert features.metadata().partition_columns == ["split"]
    # row counts per file, but no min/max statistics (the files are random row groups)
    assert features.metadata().configuration == {"delta.dataSkippingNumIndexedCols": "0"}
    adds = features.get_add_actions(flatten=True)
    assert sum(adds.column("num_records").to_pylist()) == sum(manifest["rows"].values())
    assert not [c for c in adds.schema.names if c.startswith(("min.", "max."))], adds.schema.names
    for split, n in manifest["rows"].items():
        files, version = split_files(out, split, manifest)  # what the trainer reads
        assert version == 1 and len(files) == math.ceil(n / 100), split
        sizes = [pq.ParquetFile(f.replace("file://", "")).metadata.num_rows for f in files]
        assert sum(sizes) == n and max(sizes) - min(sizes) <= max(30, n // len(files) // 2), sizes


def test_failed_publish_keeps_previous_versions_and_manifest(spark, delta_out, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(delta_out[0], out)
    before = (out / "manifest.json").read_bytes()
    real, calls = fm.write_table, []

    def failing_write(df, path, *a, **kw):
        calls.append(Path(path).name)
        if len(calls) > 1:
            raise OSError(f"injected failure writing {path}")
        return real(df, path, *a, **kw)

    monkeypatch.setattr(fm, "write_table", failing_write)
    with pytest.raises(OSError, match="injected failure"):
        build_features(_cfg(out, min_count=4), make_source(spark))
    assert calls == ["features", "vocab"]
    assert (out / "manifest.json").read_bytes() == before
    manifest = json.loads(before)
    feats = read_table(spark, out / "features", "delta", manifest["tables"]["features"]["version"])
    assert feats.count() == sum(manifest["rows"].values())

    monkeypatch.setattr(fm, "write_table", real)
    with pytest.raises(RejectBoundError, match=r"max_reject_fraction=0.01.*'unparseable'"):
        build_features(_cfg(out), make_source(spark, rejects=20, reasons=("unparseable",)))
    assert (out / "manifest.json").read_bytes() == before
    assert DeltaTableVersion(out / "vocab") == 1 and DeltaTableVersion(out / "rejects") == 1


def DeltaTableVersion(path: Path) -> int:  # noqa: N802  (reads like the class it wraps)
    from deltalake import DeltaTable

    return DeltaTable(str(path)).version()


# ---------------------------------------------------------------- end to end on the real AITM sample

AITM_NAMES = ["101", "121", "122", "124", "125", "126", "127", "128", "129",
              "205", "206", "207", "216", "508", "509", "702", "853", "301"]


def aitm_rows(folder: Path) -> dict[str, list[list[Optional[str]]]]:
    """Valid rows per input split read with plain csv ("0" is missing in AITM CSVs, as the
    reader documents); rows with purchase and no click are dropped."""
    out = {}
    for split, header in (("train", True), ("test", False)):
        with open(folder / f"{split}.csv", newline="") as fh:
            rows = list(csv.reader(fh))[1 if header else 0:]
        out[split] = [[int(r[0]), int(r[1])] + [None if v in ("", "0") else v for v in r[2:]]
                      for r in rows if not (r[0] == "0" and r[1] == "1")]
    return out


def _stored_rdds(spark) -> int:
    """RDDs with blocks in Spark's storage (persisted frames, local checkpoints)."""
    return len(spark.sparkContext._jsc.sc().getRDDStorageInfo())


@pytest.mark.parametrize("min_count,fmt,truncate", [(1, "delta", True), (2, "parquet", False)])
def test_end_to_end_on_aitm_sample(spark, shared_fixtures, tmp_path, min_count, fmt, truncate):
    folder = shared_fixtures / "PaddleRec" / "aitm"
    cfg = FeaturesConfig(source="aitm-csv", input=str(folder), output=str(tmp_path), format=fmt,
                         min_count=min_count, max_reject_fraction=0.1, rows_per_file=20, seed=3,
                         truncate_lineage=truncate)
    stored = _stored_rdds(spark)
    manifest = fm.run_features(spark, cfg)
    assert _stored_rdds(spark) <= stored  # persisted frames and the local checkpoint are freed
    rows = aitm_rows(folder)
    assert manifest["rows_in"] == {"train": 48, "test": 50}
    assert manifest["rejects"] == {"conversion_without_click": 48 + 50 - len(rows["train"]) - len(rows["test"])}
    assert manifest["accounting"] == {
        "train": {"rows_in": 48, "features": len(rows["train"]), "rejects": 48 - len(rows["train"])},
        "test": {"rows_in": 50, "features": len(rows["test"]), "rejects": 50 - len(rows["test"])}}
    vocab = {}
    for j, name in enumerate(AITM_NAMES):
        counts = Counter(r[2 + j] for r in rows["train"] if r[2 + j] is not None)
        kept = sorted((v for v, c in counts.items() if c >= min_count), key=lambda v: (-counts[v], v))
        vocab[name] = {v: i + 1 for i, v in enumerate(kept)}
    assert [(f["name"], f["vocab_size"]) for f in manifest["fields"]] == [
        (n, len(vocab[n]) + 1) for n in AITM_NAMES]
    spec = FeatureSpec.from_manifest(manifest)
    assert spec.sparse_fields == tuple(AITM_NAMES) and spec.groups["205"] == "item"

    table = read_table(spark, tmp_path / "features", fmt, manifest["tables"]["features"]["version"])
    got = {s: Counter() for s in ("train", "test")}
    for r in table.collect():
        got["test" if r.split == "test" else "train"][(r.click, r.conversion, *(r[n] for n in AITM_NAMES))] += 1
    for split in ("train", "test"):  # every row, encoded with the train vocabulary, as a multiset
        expected = Counter((r[0], r[1], *(vocab[n].get(r[2 + j], 0) for j, n in enumerate(AITM_NAMES)))
                           for r in rows[split])
        assert got[split] == expected, split
    assert sum(manifest["rows"].values()) == len(rows["train"]) + len(rows["test"])
    rejects = read_table(spark, tmp_path / "rejects", fmt, manifest["tables"]["rejects"]["version"]).collect()
    raw_invalid = [line for name in ("train.csv", "test.csv")
                   for line in (folder / name).read_text().splitlines() if line.startswith("0,1,")]
    assert sorted(r.line for r in rejects) == sorted(raw_invalid)
    files, _ = split_files(tmp_path, "test", manifest)
    assert len(files) == math.ceil(manifest["rows"]["test"] / 20)
    if fmt == "parquet":
        assert (tmp_path / "features" / "_latest").read_text() == "0"
        assert not (tmp_path / "features" / "_delta_log").exists()


def test_reject_bound_on_aitm_sample(spark, shared_fixtures, tmp_path):
    cfg = FeaturesConfig(source="aitm-csv", input=str(shared_fixtures / "PaddleRec" / "aitm"),
                         output=str(tmp_path))
    with pytest.raises(RejectBoundError, match=r"5 of 98 input rows rejected .*"
                                               r"max_reject_fraction=0.01.*'conversion_without_click': 5"):
        fm.run_features(spark, cfg)
    assert not (tmp_path / "manifest.json").exists() and not (tmp_path / "features").exists()


def test_split_column_on_a_field_compares_raw_values_not_indices(spark, tmp_path):
    """``split_column`` naming a numeric field: the cut is the quantile of the field's raw
    values, and the rows are compared by their raw value, not by the vocabulary index the
    field is encoded to (index 1 is the most frequent id, whatever its value)."""
    src = make_source(spark, rejects=0)
    src.train = src.train.withColumn("101", F.col("101").cast("int"))
    src.test = src.test.withColumn("101", F.col("101").cast("int"))
    manifest = build_features(_cfg(tmp_path, min_count=2, valid_fraction=0.3, split_column="101"), src)
    cut = manifest["split"]["threshold"]
    rows = make_rows(400, 1, 0, 30)
    want = {r[0] for r in rows if int(r[3]) >= cut}
    assert 0 < len(want) < len(rows)
    feats = read_table(spark, tmp_path / "features", "delta").where("split = 'valid'").collect()
    assert {r.sample_id for r in feats} == want


def test_split_by_input_file_takes_the_last_files_in_name_order(spark, tmp_path):
    """``split_column: source_file``: a train input of one file per day; the last days (by
    file name), as few as hold valid_fraction of the train rows and never all, are valid."""
    from cvr_spark.data.sources import read_source

    folder = tmp_path / "joined"
    folder.mkdir()
    days = {"train_day3.txt": 3, "train_day1.txt": 6, "train_day2.txt": 3}  # written out of order
    sid = 0
    for name, n in days.items():
        lines = []
        for _ in range(n):
            sid += 1
            lines.append(f"{sid},{sid % 2},0,101:u{sid % 3},205:i{sid % 2}")
        (folder / name).write_text("\n".join(lines) + "\n")
    train = read_source(spark, "paddle-joined", str(folder)).train
    by_file = {r["_file_index"]: r["count"] for r in train.groupBy("_file_index").count().collect()}
    assert by_file == {0: 6, 1: 3, 2: 3}  # day1, day2, day3
    assert fm.file_threshold(train, 0.2) == 2   # day3 (3 of 12 rows) reaches 20 %
    assert fm.file_threshold(train, 0.4) == 1   # day2 + day3 reach 40 %
    assert fm.file_threshold(train, 0.9) == 1   # day1 always stays train
    with pytest.raises(ValueError, match="at least 2 files"):
        fm.file_threshold(train.where("_file_index = 0"), 0.2)
    cfg = fm.FeaturesConfig(source="paddle-joined", input=str(folder), output=str(tmp_path / "out"),
                            min_count=1, valid_fraction=0.2, split_column="source_file")
    manifest = fm.run_features(spark, cfg)
    assert manifest["rows"] == {"train": 9, "valid": 3}
    assert manifest["split"]["mode"] == "column" and manifest["split"]["threshold"] == 2
    valid_ids = {r["sample_id"] for r in read_table(spark, str(tmp_path / "out" / "features")).where(
        "split = 'valid'").select("sample_id").collect()}
    assert len(valid_ids) == 3


def test_stored_rows_that_went_to_disk_are_reported(spark, caplog):
    """A local checkpoint's stored rows are measured from Spark's storage status; rows on disk
    (they did not fit in storage memory) are logged as a warning, rows in memory are not."""
    import logging

    from pyspark import StorageLevel

    held = []
    in_memory = fm._persist(spark.range(500).toDF("x"), held, checkpoint=True)
    on_disk = spark.range(500).toDF("x").localCheckpoint(eager=True, storageLevel=StorageLevel.DISK_ONLY)
    with caplog.at_level(logging.WARNING, logger=fm.__name__):
        mem, disk = fm.warn_if_on_disk(in_memory, "in memory")
        assert mem > 0 and disk == 0 and not caplog.records
        mem, disk = fm.warn_if_on_disk(on_disk, "the test rows")
        assert mem == 0 and disk > 0
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "the test rows" in caplog.text and "went to disk" in caplog.text
    cached = spark.range(3).cache()
    assert fm.stored_sizes(cached) is None  # not a local checkpoint
    for d in (*held, on_disk, cached):
        fm._release(d)


def test_stored_frames_keep_their_rows_deserialized(spark):
    """The job's stored frames (parsed lines, vocab, rejects) use the JVM's deserialized
    memory level: PySpark's MEMORY_AND_DISK would serialize every stored row."""
    from pyspark import StorageLevel

    held = []
    df = spark.range(20).toDF("x")
    checkpointed = fm._persist(df, held, checkpoint=True)
    level = checkpointed._jdf.queryExecution().analyzed().rdd().getStorageLevel()
    assert (level.useMemory(), level.useDisk(), level.deserialized()) == (True, True, True)
    persisted = fm._persist(df.selectExpr("x + 1 AS y"), held)
    assert persisted.storageLevel == StorageLevel.MEMORY_AND_DISK_DESER
    assert sorted(r.x for r in checkpointed.collect()) == list(range(20))
    assert persisted.count() == 20
    for d in held:
        fm._release(d)
    assert not persisted.is_cached
