"""FeatureLoader on small hand-written features tables (Delta via deltalake, versioned Parquet)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from deltalake import WriterProperties, write_deltalake

from cvr_spark.train.loader import FeatureLoader, assign_row_groups, batch_sizes, load_manifest, RowGroup

SPARSE = {"101": 40, "205": 30, "301": 5}
MULTI = {"150_14": 20}
DENSE = ["D1", "D2"]
SPLITS = {"train": 0, "valid": 1, "test": 2}


def make_rows(n: int, seed: int, id_offset: int = 0) -> pa.Table:
    """Rows of the features contract; split drawn at random; some nulls and empty lists."""
    rng = np.random.default_rng(seed)
    lists = []
    for i in range(n):
        k = int(rng.integers(0, 5))
        lists.append(None if i % 11 == 3 else [int(x) for x in rng.integers(1, MULTI["150_14"], k)])
    click = rng.integers(0, 2, n)
    conversion = click * rng.integers(0, 2, n)
    user_key = pa.array([None if i % 7 == 0 else int(x) for i, x in enumerate(rng.integers(1, 10**12, n))],
                        pa.int64())
    cols = {"sample_id": pa.array(np.arange(n) + id_offset, pa.int64())}
    cols.update({f: pa.array(rng.integers(0, v, n), pa.int32()) for f, v in SPARSE.items()})
    cols["150_14"] = pa.array(lists, pa.list_(pa.int32()))
    cols.update({d: pa.array(rng.random(n), pa.float32()) for d in DENSE})
    cols.update({"click": pa.array(click, pa.int32()), "conversion": pa.array(conversion, pa.int32()),
                 "ctcvr": pa.array(click * conversion, pa.int32()),
                 "ctnocvr": pa.array(click * (1 - conversion), pa.int32()),
                 "user_key": user_key, "item_key": pa.array(rng.integers(1, 10**9, n), pa.int64()),
                 "split": pa.array(rng.choice(list(SPLITS), n, p=[0.7, 0.15, 0.15]))})
    return pa.table(cols)


def write_manifest(data_dir: Path, fmt: str, version: int | None) -> None:
    fields = [{"name": f, "group": "user" if f == "101" else "item" if f == "205" else "context",
               "multi": False, "vocab_size": v} for f, v in SPARSE.items()]
    fields += [{"name": f, "group": "user", "multi": True, "vocab_size": v} for f, v in MULTI.items()]
    manifest = {"fields": fields, "dense_fields": DENSE,
                "tables": {"features": {"path": "features", "format": fmt, "version": version}}}
    (data_dir / "manifest.json").write_text(json.dumps(manifest))


def write_delta(data_dir: Path, table: pa.Table, mode: str = "error") -> None:
    write_deltalake(str(data_dir / "features"), table, partition_by=["split"], mode=mode,
                    writer_properties=WriterProperties(max_row_group_size=16))


def write_parquet_version(data_dir: Path, table: pa.Table, version: int) -> None:
    """The project's versioned layout: features/v=<N>/split=<s>/part-*.parquet + _latest."""
    root = data_dir / "features"
    for split in SPLITS:
        part = table.filter(pa.compute.equal(table.column("split"), split)).drop_columns(["split"])
        for k, start in enumerate(range(0, part.num_rows, 40)):
            out = root / f"v={version}" / f"split={split}" / f"part-{k:05d}.parquet"
            out.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(part.slice(start, 40), out, row_group_size=13)
    (root / "_latest").write_text(str(version))


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> dict[str, tuple[Path, pa.Table]]:
    """One Delta and one Parquet data dir, each with two versions (v1 is the manifest's)."""
    out = {}
    v0, v1 = make_rows(120, seed=1, id_offset=10_000), make_rows(230, seed=2)
    d = tmp_path_factory.mktemp("delta")
    write_delta(d, v0)
    write_delta(d, v1, mode="overwrite")
    write_manifest(d, "delta", 1)
    out["delta"] = (d, v1, v0)
    p = tmp_path_factory.mktemp("parquet")
    write_parquet_version(p, v0, 0)
    write_parquet_version(p, v1, 1)
    write_manifest(p, "parquet", None)
    out["parquet"] = (p, v1, v0)
    return out


def split_ids(table: pa.Table, split: str) -> list[int]:
    mask = pa.compute.equal(table.column("split"), split)
    return sorted(table.filter(mask).column("sample_id").to_pylist())


def epoch_ids(loader: FeatureLoader) -> list[int]:
    return [int(x) for b in loader for x in b["sample_id"]]


@pytest.mark.parametrize("fmt", ["delta", "parquet"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 24])  # 24 > row groups: sliced groups
@pytest.mark.parametrize("in_memory", [True, False])
def test_shards_cover_split_once(tables, fmt, world_size, in_memory):
    data_dir, v1, _ = tables[fmt]
    loaders = [FeatureLoader(str(data_dir), "train", 9, rank=r, world_size=world_size,
                             in_memory=in_memory, seed=3, buffer_row_groups=2) for r in range(world_size)]
    assert len({len(ld) for ld in loaders}) == 1, "every rank runs the same number of batches"
    seen = []
    for ld in loaders:
        ids = epoch_ids(ld)
        assert len(ids) == ld.num_rows
        counts = [len(b["sample_id"]) for b in ld]
        assert len(counts) == len(ld) and max(counts) - min(counts) <= 1 and max(counts) <= 9
        seen += ids
    assert sorted(seen) == split_ids(v1, "train")  # disjoint and complete
    assert len(loaders[0]) == -(-max(ld.num_rows for ld in loaders) // 9)


def test_determinism_and_epoch_reshuffle(tables):
    data_dir = tables["delta"][0]
    a = FeatureLoader(str(data_dir), "train", 16, seed=5)
    b = FeatureLoader(str(data_dir), "train", 16, seed=5)
    assert epoch_ids(a) == epoch_ids(b)
    first = epoch_ids(a)
    a.set_epoch(1)
    second = epoch_ids(a)
    assert first != second and sorted(first) == sorted(second)
    b.set_epoch(1)
    assert epoch_ids(b) == second
    assert epoch_ids(FeatureLoader(str(data_dir), "train", 16, seed=6)) != first
    plain = epoch_ids(FeatureLoader(str(data_dir), "train", 16, shuffle=False))
    assert plain == epoch_ids(FeatureLoader(str(data_dir), "train", 16, shuffle=False, in_memory=False))


@pytest.mark.parametrize("fmt", ["delta", "parquet"])
def test_version_pinning(tables, fmt):
    data_dir, v1, v0 = tables[fmt]
    latest = FeatureLoader(str(data_dir), "valid", 50)
    assert latest.table_version == 1 and sorted(epoch_ids(latest)) == split_ids(v1, "valid")
    pinned = FeatureLoader(str(data_dir), "valid", 50, version=0)
    assert pinned.table_version == 0 and sorted(epoch_ids(pinned)) == split_ids(v0, "valid")


def test_manifest_version_is_the_default(tmp_path):
    old, new = make_rows(60, seed=7, id_offset=500), make_rows(60, seed=8)
    write_delta(tmp_path, old)
    write_delta(tmp_path, new, mode="overwrite")
    write_manifest(tmp_path, "delta", 0)  # the manifest describes version 0
    loader = FeatureLoader(str(tmp_path), "train", 64)
    assert loader.table_version == 0 and sorted(epoch_ids(loader)) == split_ids(old, "train")
    assert FeatureLoader(str(tmp_path), "train", 64, version=1).table_version == 1


@pytest.mark.parametrize("fmt", ["delta", "parquet"])
def test_streaming_equals_in_memory_as_multiset(tables, fmt):
    data_dir = tables[fmt][0]

    def rows(loader: FeatureLoader) -> Counter:
        out = Counter()
        for b in loader:
            for i in range(len(b["sample_id"])):
                n = int(b["multi_len"][i, 0])
                out[(int(b["sample_id"][i]), tuple(b["sparse"][i].tolist()), tuple(b["multi"][i, 0, :n].tolist()),
                     tuple(b["dense"][i].tolist()), float(b["click"][i]), float(b["conversion"][i]),
                     int(b["user_key"][i]), int(b["item_key"][i]))] += 1
        return out

    for rank in range(2):
        mem = FeatureLoader(str(data_dir), "test", 7, rank=rank, world_size=2, seed=1)
        stream = FeatureLoader(str(data_dir), "test", 7, rank=rank, world_size=2, seed=1,
                               in_memory=False, buffer_row_groups=1)
        assert len(mem) == len(stream)
        assert rows(mem) == rows(stream) and sum(rows(mem).values()) == mem.num_rows


def test_batch_values_padding_and_dtypes(tables):
    data_dir, v1, _ = tables["delta"]
    loader = FeatureLoader(str(data_dir), "train", 32, seed=0)
    src = {r["sample_id"]: r for r in v1.to_pylist()}
    assert loader.spec.sparse_fields == ("101", "205", "301") and loader.spec.multi_fields == ("150_14",)
    for b in loader:
        B = len(b["sample_id"])
        assert b["sparse"].dtype == torch.int64 and b["sparse"].shape == (B, 3)
        assert b["multi"].dtype == torch.int64 and b["multi"].shape[:2] == (B, 1)
        assert b["multi_len"].shape == (B, 1) and b["dense"].shape == (B, 2)
        assert b["dense"].dtype == b["click"].dtype == b["conversion"].dtype == torch.float32
        assert b["user_key"].dtype == b["sample_id"].dtype == torch.int64
        assert b["multi"].shape[2] == max(1, int(b["multi_len"].max()))
        for i in range(B):
            row = src[int(b["sample_id"][i])]
            assert b["sparse"][i].tolist() == [row[f] for f in ("101", "205", "301")]
            lst = row["150_14"] or []
            n = int(b["multi_len"][i, 0])
            assert n == len(lst) and b["multi"][i, 0, :n].tolist() == lst
            assert b["multi"][i, 0, n:].eq(0).all()
            assert int(b["user_key"][i]) == (-1 if row["user_key"] is None else row["user_key"])
            assert float(b["click"][i]) == row["click"] and float(b["conversion"][i]) == row["conversion"]
            assert np.allclose(b["dense"][i].numpy(), [row["D1"], row["D2"]])


def test_assignment_balances_rows():
    groups = [RowGroup("a", i, n) for i, n in enumerate([50, 10, 30, 20, 40, 5])]
    shards = assign_row_groups(groups, 2)
    assert [sum(g.num_rows for g in s) for s in shards] == [80, 75]
    assert sorted(g.index for s in shards for g in s) == list(range(6))
    assert batch_sizes(10, 3) == [4, 3, 3] and sum(batch_sizes(7, 7)) == 7
    # fewer groups than ranks: row ranges of the largest groups, still disjoint and complete
    shards = assign_row_groups(groups, 8)
    assert all(s for s in shards) and sum(g.num_rows for s in shards for g in s) == 155
    rows = sorted((g.index, r) for s in shards for g in s for r in range(g.start, g.start + g.num_rows))
    assert rows == [(i, r) for i, n in enumerate([50, 10, 30, 20, 40, 5]) for r in range(n)]
    with pytest.raises(ValueError, match="3 rows in 1 non-empty row groups for 4 ranks"):
        assign_row_groups([RowGroup("a", 0, 3)], 4)


def test_bad_input_errors(tables, tmp_path):
    data_dir = tables["delta"][0]
    with pytest.raises(FileNotFoundError, match="manifest"):
        load_manifest(tmp_path)
    with pytest.raises(ValueError, match="rank"):
        FeatureLoader(str(data_dir), "train", 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="split 'nope' has no files"):
        FeatureLoader(str(data_dir), "nope", 8)
    (tmp_path / "manifest.json").write_text('{"fields": [\n oops')
    with pytest.raises(ValueError, match="line 2"):
        load_manifest(tmp_path)
    bad = make_rows(40, seed=4)
    bad = bad.set_column(bad.schema.get_field_index("205"), "205", pa.array([99] * 40, pa.int32()))
    write_parquet_version(tmp_path, bad, 0)
    write_manifest(tmp_path, "parquet", None)
    with pytest.raises(ValueError, match=r"column '205' has index 99\.\.99, expected 0\.\.29"):
        FeatureLoader(str(tmp_path), "train", 8)
    write_parquet_version(tmp_path, make_rows(40, seed=4).drop_columns(["click"]), 1)
    with pytest.raises(KeyError, match=r"part-00000.parquet \(row group 0\): column 'click' missing"):
        FeatureLoader(str(tmp_path), "train", 8)


class FakePetastorm:
    """Stands in for petastorm's batch reader: one namedtuple of numpy columns per row group."""

    def __init__(self, urls: list[str], columns: list[str], drop_last_group: bool = False) -> None:
        from urllib.parse import unquote, urlparse

        self.paths = [unquote(urlparse(u).path) for u in urls]
        self.columns, self.drop = columns, drop_last_group

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def __iter__(self):
        groups = [(p, i) for p in self.paths for i in range(pq.ParquetFile(p).num_row_groups)]
        for p, i in groups[:-1] if self.drop else groups:
            t = pq.ParquetFile(p).read_row_group(i)
            cols = {}
            for c in [c for c in self.columns if c in t.column_names]:
                arr = t.column(c).to_numpy(zero_copy_only=False)
                if pa.types.is_list(t.schema.field(c).type):
                    arr = np.array([None if v is None else np.asarray(v) for v in arr], dtype=object)
                cols[c] = arr
            yield _Row(cols)


class _Row:
    """Minimal namedtuple stand-in (field names like "101" are not valid namedtuple names)."""

    def __init__(self, cols: dict) -> None:
        self.cols = cols

    def _asdict(self) -> dict:
        return self.cols


def make_fake_loader(drop: bool = False):
    from cvr_spark.train.petastorm_loader import PetastormLoader

    class FakeLoader(PetastormLoader):
        def _check_backend(self) -> None:
            return None

        def _open_reader(self, urls, seed):
            return FakePetastorm(urls, self._columns(), drop_last_group=drop)

    return FakeLoader


def test_petastorm_missing_gives_clear_error(tables, monkeypatch):
    import sys

    from cvr_spark.train.petastorm_loader import PetastormLoader, PetastormUnavailable

    monkeypatch.setitem(sys.modules, "petastorm", None)  # import fails like a missing package
    with pytest.raises(PetastormUnavailable, match=r"petastorm cannot be imported.*cvr-spark\[petastorm\]"):
        PetastormLoader(str(tables["parquet"][0]), "train", 8)


def test_petastorm_adapter_covers_rows_and_checks_count(tables):
    data_dir, v1, _ = tables["parquet"]
    fake = make_fake_loader()
    loaders = [fake(str(data_dir), "train", 6, rank=r, world_size=2, seed=1) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1])
    seen = []
    for ld in loaders:
        batches = list(ld)
        assert len(batches) == len(ld) and sum(len(b["sample_id"]) for b in batches) == ld.num_rows
        assert {"sparse", "multi", "multi_len", "dense", "click", "conversion", "user_key"} <= set(batches[0])
        seen += [int(x) for b in batches for x in b["sample_id"]]
    assert sorted(seen) == split_ids(v1, "train")
    mem = FeatureLoader(str(data_dir), "train", 6)
    ref = {int(s): b["multi"][i, 0, : int(b["multi_len"][i, 0])].tolist()
           for b in mem for i, s in enumerate(b["sample_id"])}
    for b in loaders[0]:
        for i, s in enumerate(b["sample_id"]):
            assert b["multi"][i, 0, : int(b["multi_len"][i, 0])].tolist() == ref[int(s)]
    with pytest.raises(RuntimeError, match="petastorm delivered .* rows .* expected"):
        list(make_fake_loader(drop=True)(str(data_dir), "train", 6))


def test_train_loader_option_picks_the_reader(tmp_path, monkeypatch):
    import sys

    from cvr_spark.train import loader as loader_module
    from cvr_spark.train.experiment import run_train
    from cvr_spark.train.loop import TrainConfig
    from cvr_spark.train.petastorm_loader import PetastormUnavailable
    from tests.test_loop import write_features

    assert loader_module.loader_class("arrow") is FeatureLoader
    with pytest.raises(ValueError, match="train.loader must be one of"):
        TrainConfig(loader="pandas")
    data = write_features(tmp_path / "data")
    over = ["train.progress=false", "train.num_threads=1", "model.batch_size=200", "train.loader=petastorm"]
    monkeypatch.setitem(sys.modules, "petastorm", None)  # the extra is missing: refused before training
    with pytest.raises(PetastormUnavailable, match=r"cvr-spark\[petastorm\]"):
        run_train(data, ["esmm"], [1], "fast", 1, out_dir=tmp_path / "runs", overrides=over)
    assert not (tmp_path / "runs").exists()

    made = []

    class Recording(FeatureLoader):  # stands in for PetastormLoader (same interface)
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self.split)

    monkeypatch.setattr(loader_module, "loader_class", lambda name: Recording if name == "petastorm" else FeatureLoader)
    run_train(data, ["esmm"], [1], "fast", 1, out_dir=tmp_path / "runs", overrides=over)
    assert made == ["train", "valid"]
