"""Optional petastorm reader behind :class:`~cvr_spark.train.loader.FeatureLoader`'s interface.

petastorm is an optional extra (``pip install cvr-spark[petastorm]``): it needs pyarrow < 15
and numpy < 2 (so pyspark 4.0 at most), and its thread-pool reader has been seen to return no
rows. So the import is isolated here, incompatible versions fail with a clear message,
the reader runs with the ``dummy`` (same-thread) pool, and every epoch is checked against
the row count the Parquet footers promise.

Sharding differs from FeatureLoader on purpose: petastorm's own ``cur_shard`` assignment of
row groups is an internal detail that changed across versions, so the expected row count per
rank could not be known. Instead whole **files** are assigned to ranks (same greedy balance,
from metadata only) and each rank's reader gets only its own file URLs; the expected count is
then exact. Nullable 64-bit keys (``user_key``) pass through petastorm as float64, so hashes
above 2**53 lose precision on this path. Batch counts are equalised as in FeatureLoader
(``ceil(max_rank_rows / batch_size)`` near-equal chunks per rank).
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from cvr_spark.models.base import FeatureSpec
from cvr_spark.train.loader import (
    KEYS, LABELS, Columns, RowGroup, assign_row_groups, batch_sizes, load_manifest, row_groups, split_files,
)

INSTALL_HINT = ("petastorm is optional: install it with `pip install 'cvr-spark[petastorm]'` in an "
                "environment with pyarrow<15 and numpy<2 (pyspark<=4.0), or use FeatureLoader (the default)")


class PetastormUnavailable(ImportError):
    """petastorm is missing, or cannot work with the installed pyarrow / numpy."""


def require_petastorm() -> Any:
    """Import petastorm and check the versions it needs.

    Raises:
        PetastormUnavailable: not installed, fails to import, or pyarrow >= 15 / numpy >= 2.
    """
    try:
        import petastorm
    except Exception as e:  # ImportError, or AttributeError etc. raised by numpy 2 / new pyarrow
        raise PetastormUnavailable(f"petastorm cannot be imported ({type(e).__name__}: {e}); {INSTALL_HINT}") from e
    pa_major, np_major = int(pa.__version__.split(".")[0]), int(np.__version__.split(".")[0])
    if pa_major >= 15 or np_major >= 2:
        raise PetastormUnavailable(f"petastorm {getattr(petastorm, '__version__', '?')} is incompatible with "
                                   f"pyarrow {pa.__version__} / numpy {np.__version__}; {INSTALL_HINT}")
    return petastorm


def _file_units(files: list[str]) -> list[RowGroup]:
    """One unit per file (index -1 = the whole file) with its row count from the footers."""
    rows: dict[str, int] = defaultdict(int)
    for g in row_groups(files):
        rows[g.path] += g.num_rows
    return [RowGroup(f, -1, rows[f]) for f in files]


def _to_arrow(batch: Any) -> pa.Table:
    """A petastorm batch (namedtuple of numpy columns) as a pyarrow table."""
    cols = {}
    for name, values in batch._asdict().items():
        if isinstance(values, np.ndarray) and values.dtype == object:  # list columns: arrays per row
            cols[name] = pa.array([None if v is None else list(v) for v in values], pa.list_(pa.int64()))
        else:  # nullable ints arrive as float with NaN (pandas style): NaN -> null
            cols[name] = pa.array(values, from_pandas=True)
    return pa.table(cols)


class PetastormLoader:
    """Same constructor, attributes and iteration as FeatureLoader, reading with petastorm.

    ``in_memory`` is accepted for interface compatibility and ignored: petastorm always streams.

    Raises:
        PetastormUnavailable: see :func:`require_petastorm`.
        ValueError: as FeatureLoader (bad arguments, empty split, fewer files than ranks).
        RuntimeError: (while iterating) petastorm delivered a different number of rows than expected.
    """

    def __init__(self, data_dir: str, split: str, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, seed: int = 0, in_memory: bool = True,
                 device: str | torch.device = "cpu", version: int | None = None,
                 spec: FeatureSpec | None = None) -> None:
        self._check_backend()
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
        self.manifest = load_manifest(data_dir)
        self.spec = spec if spec is not None else FeatureSpec.from_manifest(self.manifest)
        self.split, self.batch_size, self.rank, self.world_size = split, batch_size, rank, world_size
        self.shuffle, self.seed, self.device, self.epoch = shuffle, seed, torch.device(device), 0
        files, self.table_version = split_files(data_dir, split, self.manifest, version)
        if not files:
            raise ValueError(f"split '{split}' has no files in {data_dir} (table version {self.table_version})")
        shards = assign_row_groups(_file_units(files), world_size)
        self.files = [u.path for u in shards[rank]]
        self.num_rows = sum(u.num_rows for u in shards[rank])
        shard_rows = [sum(u.num_rows for u in s) for s in shards]
        self.n_batches = math.ceil(max(shard_rows) / batch_size)
        if min(shard_rows) < self.n_batches:
            raise ValueError(f"files of split '{split}' too uneven for {world_size} ranks (rows {shard_rows})")

    def _check_backend(self) -> None:
        require_petastorm()

    def _columns(self) -> list[str]:
        return ["sample_id", *self.spec.sparse_fields, *self.spec.multi_fields, *self.spec.dense_fields,
                *LABELS, *KEYS]

    def _open_reader(self, urls: list[str], seed: int) -> Iterable[Any]:
        """A petastorm batch reader over ``urls`` for one epoch (a context manager)."""
        from petastorm import make_batch_reader

        return make_batch_reader(urls, schema_fields=self._columns(), reader_pool_type="dummy", num_epochs=1,
                                 shuffle_row_groups=self.shuffle, seed=seed)

    def set_epoch(self, epoch: int) -> None:
        """Use the shuffle of ``(seed, epoch)`` from the next iteration on."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        urls = [f if "://" in f else Path(f).resolve().as_uri() for f in self.files]
        sizes, k, delivered, buffer = batch_sizes(self.num_rows, self.n_batches), 0, 0, None
        with self._open_reader(urls, int(rng.integers(2**31))) as reader:
            for raw in reader:
                block = Columns.from_arrow(_to_arrow(raw), self.spec, f"petastorm batch of {self.split}")
                delivered += len(block)
                buffer = block if buffer is None else Columns.concat([buffer, block])
                order = torch.from_numpy(rng.permutation(len(buffer)) if self.shuffle else np.arange(len(buffer)))
                pos = 0
                while k < len(sizes) - 1 and len(buffer) - pos >= sizes[k]:  # the last batch waits for the end
                    yield self._to_device(buffer.take(order[pos:pos + sizes[k]]))
                    pos, k = pos + sizes[k], k + 1
                buffer = buffer.select(order[pos:])
        if delivered != self.num_rows:
            raise RuntimeError(f"petastorm delivered {delivered} rows of split '{self.split}' on rank {self.rank}, "
                               f"expected {self.num_rows} (Parquet metadata of {len(self.files)} files)")
        if buffer is not None and k < len(sizes):
            yield self._to_device(buffer.take(torch.arange(len(buffer))))

    def _to_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return batch if self.device.type == "cpu" else {k: v.to(self.device) for k, v in batch.items()}
