"""Trainer input: the ``features`` table read with pyarrow into columnar tensors, sharded by rank.

No Spark, no per-sample ``__getitem__``: a split's Parquet files are known from the table
layout (Delta partition values, or ``split=<name>`` Hive folders of the versioned Parquet
layout), their row groups from the Parquet footers, and whole columns become tensors.

**Sharding.** Row groups of the split (files sorted by path, row groups in file order) are
assigned greedily, largest first, to the rank with the fewest rows so far (ties: lowest
rank). The assignment uses Parquet metadata only, so every rank computes the same one.

**Equal batch counts.** ``n_batches = ceil(max_rank_rows / batch_size)`` on every rank; a
rank splits its (shuffled) rows into ``n_batches`` near-equal chunks (sizes differ by at most
one within a rank). Ranks with fewer rows get slightly smaller batches, so all ranks run the
same number of steps and together cover every row of the split exactly once per epoch.

**Batches** follow :mod:`cvr_spark.models.base`: ``sparse`` int64 [B, F] (``spec.sparse_fields``
order), ``multi`` int64 [B, M, L] and ``multi_len`` int64 [B, M] (L = longest list in the batch,
at least 1, padded with 0), ``dense`` float32 [B, Z], ``click`` / ``conversion`` float32 [B],
``user_key`` / ``item_key`` int64 [B] (nulls -> -1) and ``sample_id`` int64 [B]. Nulls in index
columns map to 0 (the missing index), in dense columns to 0.0; null labels are an error.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import Tensor

from cvr_spark.models.base import FeatureSpec
from cvr_spark.tables import is_delta, parquet_files

LABELS = ("click", "conversion")
KEYS = ("user_key", "item_key")
DEFAULT_BUFFER_ROW_GROUPS = 4


def load_manifest(data_dir: str | Path) -> dict:
    """Read ``<data_dir>/manifest.json`` written by the feature job.

    Raises:
        FileNotFoundError: no manifest in ``data_dir``.
        ValueError: the file is not JSON or lacks the ``fields`` key.
    """
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"no manifest at {path}: run the feature job first")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno} column {e.colno}: invalid JSON ({e.msg})") from None
    if not isinstance(manifest, dict) or "fields" not in manifest:
        raise ValueError(f"{path}: expected a JSON object with a 'fields' list")
    return manifest


@dataclass(frozen=True)
class RowGroup:
    """One Parquet row group of the split (file, index inside the file, row count), or the
    rows ``[start, start + num_rows)`` of it when a small table has fewer groups than ranks."""

    path: str
    index: int
    num_rows: int
    start: int = 0
    sliced: bool = False


def _even_ranges(groups: list[RowGroup], world_size: int) -> list[list[RowGroup]]:
    """Rank r gets rows ``[r * N // W, (r + 1) * N // W)`` of the groups laid end to end, as
    row ranges of the groups they fall in (for a small split, e.g. a validation split written
    as one row group, that has fewer row groups than ranks)."""
    total = sum(g.num_rows for g in groups)
    bounds = [r * total // world_size for r in range(world_size + 1)]
    owned: list[list[RowGroup]] = [[] for _ in range(world_size)]
    first = 0  # row number of the current group's first row in the concatenation
    for g in groups:
        for r in range(world_size):
            lo, hi = max(bounds[r], first), min(bounds[r + 1], first + g.num_rows)
            if lo < hi:
                owned[r].append(RowGroup(g.path, g.index, hi - lo, g.start + lo - first, True))
        first += g.num_rows
    return owned


def _open_parquet(path: str) -> pq.ParquetFile:
    if "://" in path:  # object stores (s3://, abfss://, ...) resolve their own file system
        from pyarrow import fs

        filesystem, inner = fs.FileSystem.from_uri(path)
        return pq.ParquetFile(filesystem.open_input_file(inner))
    return pq.ParquetFile(path)


def split_files(data_dir: str | Path, split: str, manifest: dict,
                version: Optional[int] = None) -> tuple[list[str], Optional[int]]:
    """The sorted Parquet files of ``split`` in one version of the features table, and that version.

    The table is ``manifest['tables']['features']`` (``path`` relative to ``data_dir`` or
    absolute; default ``<data_dir>/features``). ``version=None`` reads the version the manifest
    names (the one its vocabulary sizes describe), else the newest one.

    Raises:
        FileNotFoundError: no table there. ValueError: the table is not partitioned by split.
    """
    info = (manifest.get("tables") or {}).get("features") or {}
    path = Path(info.get("path") or "features")
    path = path if path.is_absolute() or "://" in str(path) else Path(data_dir) / path
    fmt = info.get("format") or ("delta" if is_delta(path) else "parquet")
    version = info.get("version") if version is None else version
    if fmt == "delta":
        from deltalake import DeltaTable

        if not is_delta(path):
            raise FileNotFoundError(f"no Delta table at {path} (no _delta_log folder)")
        dt = DeltaTable(str(path), version=version)
        if "split" not in dt.metadata().partition_columns:
            raise ValueError(f"Delta table {path} is not partitioned by 'split' "
                             f"(partition columns: {dt.metadata().partition_columns})")
        files = dt.file_uris(file_pruning_predicate=[("split", "=", split)])
        return sorted(files), dt.version()
    files = parquet_files(path, "parquet", version)
    if version is None:
        version = int((path / "_latest").read_text().strip())
    if files and not any("/split=" in f for f in files):
        raise ValueError(f"Parquet table {path} v={version} is not partitioned by 'split' "
                         f"(no split=<name> folders)")
    return sorted(f for f in files if f"/split={split}/" in f), int(version)


def row_groups(files: list[str]) -> list[RowGroup]:
    """Every row group of ``files`` from their footers (no data read)."""
    out = []
    for f in files:
        meta = _open_parquet(f).metadata
        out += [RowGroup(f, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)]
    return out


def assign_row_groups(groups: list[RowGroup], world_size: int) -> list[list[RowGroup]]:
    """Greedy balanced assignment of row groups to ranks (largest first, to the lightest rank).

    Deterministic for the same input on every rank; each rank's groups keep file order.

    With fewer non-empty row groups than ranks, ranks get even row ranges instead.

    Raises:
        ValueError: fewer rows than ranks (a rank would get no rows).
    """
    groups = [g for g in groups if g.num_rows > 0]
    total = sum(g.num_rows for g in groups)
    if total < world_size:
        raise ValueError(f"{total} rows in {len(groups)} non-empty row groups for {world_size} ranks: "
                         "every rank needs at least one row")
    if len(groups) < world_size:
        return _even_ranges(groups, world_size)
    order = sorted(range(len(groups)), key=lambda i: (-groups[i].num_rows, i))
    loads, owned = [0] * world_size, [[] for _ in range(world_size)]
    for i in order:
        r = min(range(world_size), key=lambda k: (loads[k], k))
        loads[r] += groups[i].num_rows
        owned[r].append(i)
    return [[groups[i] for i in sorted(idx)] for idx in owned]


def _int_column(table: pa.Table, name: str, dtype: pa.DataType, null: int, source: str) -> np.ndarray:
    if name not in table.column_names:
        raise KeyError(f"{source}: column '{name}' missing (expected {dtype})")
    try:
        col = pc.cast(table.column(name), dtype)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise TypeError(f"{source}: column '{name}' is {table.schema.field(name).type}, "
                        f"expected {dtype}: {e}") from None
    return np.require(col.fill_null(null).to_numpy(), requirements="W")  # torch needs writable


def _check_range(values: np.ndarray, name: str, vocab: int, source: str) -> None:
    if values.size and (values.min() < 0 or values.max() >= vocab):
        raise ValueError(f"{source}: column '{name}' has index {values.min()}..{values.max()}, "
                         f"expected 0..{vocab - 1} (vocab_size {vocab} in the manifest)")


@dataclass
class Columns:
    """A block of rows as columnar tensors (int32 indices kept compact; widened per batch).

    ``multi_values[m]`` / ``multi_offsets[m]`` hold field m as a flat list plus row offsets
    ([N+1], CSR layout), padded only when a batch is taken.
    """

    sample_id: Tensor  # [N] int64
    sparse: Tensor  # [N, F] int32
    multi_values: list[Tensor]  # M x [nnz] int32
    multi_offsets: list[Tensor]  # M x [N+1] int64
    dense: Tensor  # [N, Z] float32
    labels: dict[str, Tensor]  # click / conversion, [N] float32
    keys: dict[str, Tensor]  # user_key / item_key, [N] int64

    def __len__(self) -> int:
        return int(self.sample_id.shape[0])

    @classmethod
    def from_arrow(cls, table: pa.Table, spec: FeatureSpec, source: str) -> "Columns":
        """Convert a pyarrow table of the features contract; ``source`` names it in errors."""
        sparse = np.zeros((table.num_rows, len(spec.sparse_fields)), np.int32)  # [N, F]
        for j, (name, vocab) in enumerate(zip(spec.sparse_fields, spec.sparse_vocab)):
            sparse[:, j] = _int_column(table, name, pa.int32(), 0, source)
            _check_range(sparse[:, j], name, vocab, source)
        values, offsets = [], []
        for name, vocab in zip(spec.multi_fields, spec.multi_vocab):
            v, o = _list_column(table, name, source)
            _check_range(v, name, vocab, source)
            values.append(torch.from_numpy(v))
            offsets.append(torch.from_numpy(o))
        dense = np.zeros((table.num_rows, len(spec.dense_fields)), np.float32)  # [N, Z]
        for j, name in enumerate(spec.dense_fields):
            dense[:, j] = _int_column(table, name, pa.float32(), 0, source)
        labels = {}
        for name in LABELS:
            if name in table.column_names and table.column(name).null_count:
                raise ValueError(f"{source}: label column '{name}' has {table.column(name).null_count} nulls")
            labels[name] = torch.from_numpy(_int_column(table, name, pa.float32(), 0, source))
        keys = {k: torch.from_numpy(_int_column(table, k, pa.int64(), -1, source))
                for k in KEYS if k in table.column_names}
        return cls(torch.from_numpy(_int_column(table, "sample_id", pa.int64(), -1, source)),
                   torch.from_numpy(sparse), values, offsets, torch.from_numpy(dense), labels, keys)

    @classmethod
    def concat(cls, blocks: list["Columns"]) -> "Columns":
        """Stack row blocks (CSR offsets shifted by the values before them)."""
        first = blocks[0]
        offsets = []
        for m in range(len(first.multi_offsets)):
            parts, base = [torch.zeros(1, dtype=torch.int64)], 0
            for b in blocks:
                parts.append(b.multi_offsets[m][1:] + base)
                base += int(b.multi_offsets[m][-1])
            offsets.append(torch.cat(parts))
        return cls(
            torch.cat([b.sample_id for b in blocks]), torch.cat([b.sparse for b in blocks]),
            [torch.cat([b.multi_values[m] for b in blocks]) for m in range(len(first.multi_values))],
            offsets, torch.cat([b.dense for b in blocks]),
            {k: torch.cat([b.labels[k] for b in blocks]) for k in first.labels},
            {k: torch.cat([b.keys[k] for b in blocks]) for k in first.keys},
        )

    def to(self, device: torch.device) -> "Columns":
        return Columns(self.sample_id.to(device), self.sparse.to(device),
                       [v.to(device) for v in self.multi_values], [o.to(device) for o in self.multi_offsets],
                       self.dense.to(device), {k: v.to(device) for k, v in self.labels.items()},
                       {k: v.to(device) for k, v in self.keys.items()})

    def take(self, idx: Tensor) -> dict[str, Tensor]:
        """The batch dict of rows ``idx`` [B] (a tensor on the same device as the columns)."""
        batch = {"sample_id": self.sample_id[idx], "sparse": self.sparse[idx].long(),  # [B, F]
                 "dense": self.dense[idx], **{k: v[idx] for k, v in self.labels.items()},
                 **{k: v[idx] for k, v in self.keys.items()}}
        if self.multi_values:
            batch["multi"], batch["multi_len"] = self._pad_multi(idx)
        return batch

    def select(self, idx: Tensor) -> "Columns":
        """The rows ``idx`` [K] as a new block (multi-valued lists gathered, offsets rebuilt)."""
        values, offsets = [], []
        for v, o in zip(self.multi_values, self.multi_offsets):
            starts, lens = o[idx], o[idx + 1] - o[idx]  # [K], [K]
            new_off = torch.cat([torch.zeros(1, dtype=torch.int64, device=o.device), lens.cumsum(0)])
            within = torch.arange(int(new_off[-1]), device=o.device) - new_off[:-1].repeat_interleave(lens)
            values.append(v[starts.repeat_interleave(lens) + within])  # [nnz']
            offsets.append(new_off)  # [K+1]
        return Columns(self.sample_id[idx], self.sparse[idx], values, offsets, self.dense[idx],
                       {k: v[idx] for k, v in self.labels.items()}, {k: v[idx] for k, v in self.keys.items()})

    def _pad_multi(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        starts = torch.stack([o[idx] for o in self.multi_offsets], 1)  # [B, M]
        lens = torch.stack([o[idx + 1] for o in self.multi_offsets], 1) - starts  # [B, M]
        width = max(int(lens.max()) if lens.numel() else 0, 1)
        steps = torch.arange(width, device=idx.device)
        mask = steps.view(1, 1, -1) < lens.unsqueeze(-1)  # [B, M, L]
        pos = starts.unsqueeze(-1) + steps.view(1, 1, -1)  # [B, M, L]
        out = torch.zeros(mask.shape, dtype=torch.int64, device=idx.device)  # [B, M, L]
        for m, values in enumerate(self.multi_values):
            if values.numel():
                p = pos[:, m].clamp(max=values.numel() - 1)  # [B, L]
                out[:, m] = torch.where(mask[:, m], values[p].long(), 0)
        return out, lens


def _list_column(table: pa.Table, name: str, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Flat int32 values and int64 row offsets of an ``array<int>`` column (null list = empty)."""
    if name not in table.column_names:
        raise KeyError(f"{source}: multi-valued column '{name}' missing (expected array<int32>)")
    col = table.column(name).combine_chunks()
    if not pa.types.is_list(col.type) and not pa.types.is_large_list(col.type):
        raise TypeError(f"{source}: column '{name}' is {col.type}, expected array<int32>")
    lens = pc.fill_null(pc.list_value_length(col), 0).to_numpy().astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    values = pc.cast(pc.list_flatten(col), pa.int32()).fill_null(0).to_numpy(zero_copy_only=False)
    return np.require(values, np.int32, requirements="W"), offsets


def batch_sizes(num_rows: int, n_batches: int) -> list[int]:
    """``num_rows`` split into ``n_batches`` near-equal chunk sizes (larger chunks first)."""
    base, extra = divmod(num_rows, n_batches)
    return [base + (1 if i < extra else 0) for i in range(n_batches)]


class FeatureLoader:
    """Batches of one split of the features table for one rank (see the module docstring).

    Args:
        data_dir: folder of ``manifest.json`` and the ``features`` table.
        split: ``train`` / ``valid`` / ``test`` (a partition value of the table).
        batch_size: rows per batch on the largest shard (smaller shards: slightly fewer).
        rank / world_size: this process's shard.
        shuffle / seed: seeded permutation per epoch, reseeded by :meth:`set_epoch`.
        in_memory: hold the shard as tensors (on ``device``); else stream row groups, shuffling
            their order and rows within a buffer of ``buffer_row_groups`` groups plus leftovers.
        device: where batches are produced (``cuda`` + ``in_memory``: device-resident shard).
        version: table version to read (default: the manifest's, else the newest).
        spec: the feature spec (default: built from the manifest).

    Raises:
        FileNotFoundError: no manifest / table. ValueError: bad arguments, an empty split, fewer
            row groups than ranks, or data outside the manifest's contract (names file and column).
    """

    def __init__(self, data_dir: str, split: str, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, seed: int = 0, in_memory: bool = True,
                 device: str | torch.device = "cpu", version: int | None = None,
                 spec: FeatureSpec | None = None, buffer_row_groups: int = DEFAULT_BUFFER_ROW_GROUPS) -> None:
        if batch_size < 1 or buffer_row_groups < 1:
            raise ValueError(f"batch_size and buffer_row_groups must be >= 1, got {batch_size}, {buffer_row_groups}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.manifest = load_manifest(data_dir)
        self.spec = spec if spec is not None else FeatureSpec.from_manifest(self.manifest)
        self.split, self.batch_size, self.rank, self.world_size = split, batch_size, rank, world_size
        self.shuffle, self.seed, self.in_memory = shuffle, seed, in_memory
        self.device, self.buffer_row_groups, self.epoch = torch.device(device), buffer_row_groups, 0
        files, self.table_version = split_files(data_dir, split, self.manifest, version)
        if not files:
            raise ValueError(f"split '{split}' has no files in {data_dir} (table version {self.table_version})")
        shards = assign_row_groups(row_groups(files), world_size)
        self.row_groups = shards[rank]
        self.num_rows = sum(g.num_rows for g in self.row_groups)
        self.total_rows = sum(g.num_rows for s in shards for g in s)
        shard_rows = [sum(g.num_rows for g in s) for s in shards]
        self.n_batches = math.ceil(max(shard_rows) / batch_size)
        if min(shard_rows) < self.n_batches:
            raise ValueError(f"row groups of split '{split}' are too uneven for {world_size} ranks "
                             f"(shard rows {shard_rows}, {self.n_batches} batches): a rank would get "
                             "empty batches; write evenly sized files or use fewer ranks")
        self._files: dict[str, pq.ParquetFile] = {}
        self._columns = self._read(self.row_groups).to(self.device) if in_memory else None

    def set_epoch(self, epoch: int) -> None:
        """Use the permutation of ``(seed, epoch)`` from the next iteration on."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return self._iter_memory() if self.in_memory else self._iter_stream()

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, self.rank])

    def _read_group(self, g: RowGroup) -> Columns:
        if g.path not in self._files:
            self._files[g.path] = _open_parquet(g.path)
        pf = self._files[g.path]
        present = set(pf.schema_arrow.names)
        wanted = ["sample_id", *self.spec.sparse_fields, *self.spec.multi_fields,
                  *self.spec.dense_fields, *LABELS, *KEYS]
        table = pf.read_row_group(g.index, columns=[c for c in wanted if c in present])
        where = f"{g.path} (row group {g.index})"
        if g.sliced:
            table = table.slice(g.start, g.num_rows)
            where = f"{g.path} (row group {g.index}, rows {g.start}..{g.start + g.num_rows - 1})"
        return Columns.from_arrow(table, self.spec, where)

    def _read(self, groups: list[RowGroup]) -> Columns:
        return Columns.concat([self._read_group(g) for g in groups])

    def _iter_memory(self) -> Iterator[dict[str, Tensor]]:
        n = self.num_rows
        order = self._rng().permutation(n) if self.shuffle else np.arange(n)
        order_t = torch.from_numpy(order).to(self.device)
        start = 0
        for size in batch_sizes(n, self.n_batches):
            yield self._columns.take(order_t[start:start + size])
            start += size

    def _iter_stream(self) -> Iterator[dict[str, Tensor]]:
        rng = self._rng()
        groups = [self.row_groups[i] for i in (rng.permutation(len(self.row_groups)) if self.shuffle
                                               else range(len(self.row_groups)))]
        sizes = batch_sizes(self.num_rows, self.n_batches)
        k, buffer = 0, None
        for start in range(0, len(groups), self.buffer_row_groups):
            blocks = ([buffer] if buffer is not None else []) + [
                self._read_group(g) for g in groups[start:start + self.buffer_row_groups]]
            buffer = Columns.concat(blocks)
            order = torch.from_numpy(rng.permutation(len(buffer)) if self.shuffle else np.arange(len(buffer)))
            pos = 0
            while k < len(sizes) and len(buffer) - pos >= sizes[k]:
                yield self._to_device(buffer.take(order[pos:pos + sizes[k]]))
                pos, k = pos + sizes[k], k + 1
            buffer = buffer.select(order[pos:]) if pos < len(buffer) else None
        if k != len(sizes):
            raise RuntimeError(f"rank {self.rank}: row groups delivered fewer rows than their metadata "
                               f"({self.num_rows}); was the table rewritten while reading?")

    def _to_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.device.type == "cpu":
            return batch
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}


def loader_class(name: str = "arrow") -> type:
    """The loader class of ``train.loader``: ``arrow`` (:class:`FeatureLoader`) or ``petastorm``
    (:class:`~cvr_spark.train.petastorm_loader.PetastormLoader`, same interface; its check of the
    petastorm extra runs here, so a missing extra fails before anything is read).

    Raises:
        ValueError: another name. PetastormUnavailable: ``petastorm`` without a working extra.
    """
    if name == "arrow":
        return FeatureLoader
    if name == "petastorm":
        from cvr_spark.train.petastorm_loader import PetastormLoader, require_petastorm

        require_petastorm()
        return PetastormLoader
    raise ValueError(f"train.loader must be arrow or petastorm, got {name!r}")
