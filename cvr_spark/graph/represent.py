"""Graph nodes and their representations (MODELS.md §9.4 step 1, Eq. 2).

A group's (``user`` / ``item``) nodes are the vocabulary indices 0..V-1 of its key field
(``spec.user_key_field`` / ``spec.item_key_field``). A node's field values are the **modal**
value of each of the group's single-valued fields (:func:`~cvr_spark.models.cstwa_graph.graph_fields`
order) over the node's training rows; its representation is the concatenation of the
pre-trained embeddings of those values, e_u = E[v_u1] ⊕ ... ⊕ E[v_uM] ∈ R^{M*D}.

Decisions where the spec is silent (MODELS.md §9.4 [I]):

* Mode ties go to the smallest index; the missing index 0 wins only when a node has no
  other value for that field (a profile field missing on some rows does not blank it).
* Node 0 (the OOV key) and nodes with no training row (possible when the valid split was
  carved out of the train input) are not searched: self-only rows in the graph, field values
  0 except the key column (which is always the node itself).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cvr_spark.models.base import FeatureSpec
from cvr_spark.models.cstwa_graph import graph_fields
from cvr_spark.train.loader import split_files

GROUPS = ("user", "item")


@dataclass
class NodeTable:
    """One group's nodes: ``node_fields`` [N, M] int64 (fields in ``fields`` order) and
    ``searchable`` [N] bool (has training rows and is not node 0)."""

    group: str
    key_field: str
    fields: list[str]
    node_fields: np.ndarray
    searchable: np.ndarray

    @property
    def num_nodes(self) -> int:
        return int(self.node_fields.shape[0])


def key_field(spec: FeatureSpec, group: str) -> str:
    """The key field of ``group``, checked to be one of its single-valued fields.

    Raises:
        ValueError: unknown group, or the key is not a single-valued field of the group.
    """
    if group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
    key = spec.user_key_field if group == "user" else spec.item_key_field
    fields = graph_fields(spec, group)
    if key not in fields:
        raise ValueError(f"manifest: {group} key field {key!r} is not a single-valued '{group}' field "
                         f"(the group's single-valued fields: {fields})")
    return key


def modal_values(keys: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Per key in [0, n): its most frequent value (ties: smallest; 0 only if nothing else).

    Args:
        keys / values: [R] integer arrays of the same length (one entry per row).

    Returns:
        [n] int64, -1 for keys without rows.
    """
    if keys.shape != values.shape:
        raise ValueError(f"keys {keys.shape} and values {values.shape} differ in shape")
    out = np.full(n, -1, np.int64)
    if keys.size == 0:
        return out
    order = np.lexsort((values, keys))  # rows grouped by (key, value)
    k, v = keys[order].astype(np.int64), values[order].astype(np.int64)  # [R]
    starts = np.flatnonzero(np.r_[True, (k[1:] != k[:-1]) | (v[1:] != v[:-1])])  # one per (key, value) run
    counts = np.diff(np.r_[starts, k.size])  # [U]
    rk, rv = k[starts], v[starts]  # [U]
    best = np.lexsort((rv, -counts, rv == 0, rk))  # per key: non-missing first, then count, then index
    first = best[np.r_[True, rk[best][1:] != rk[best][:-1]]]
    out[rk[first]] = rv[first]
    return out


def _open_parquet(path: str) -> pq.ParquetFile:
    if "://" in path and not path.startswith("file://"):
        from pyarrow import fs

        filesystem, inner = fs.FileSystem.from_uri(path)
        return pq.ParquetFile(filesystem.open_input_file(inner))
    return pq.ParquetFile(path.removeprefix("file://"))


def read_train_columns(data_dir: str, manifest: dict, columns: Sequence[str],
                       version: Optional[int] = None) -> tuple[dict[str, np.ndarray], Optional[int]]:
    """``columns`` of the train split of the features table (pyarrow, nulls -> 0) and its version.

    Raises:
        KeyError: a column is missing (names the file). ValueError: the split is empty.
    """
    files, table_version = split_files(data_dir, "train", manifest, version)
    if not files:
        raise ValueError(f"{data_dir}: features table version {table_version} has no train rows")
    parts: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    for f in files:
        pf = _open_parquet(f)
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            raise KeyError(f"{f}: column(s) {missing} missing (expected int32 field indices)")
        table = pf.read(columns=list(columns))
        for c in columns:
            parts[c].append(pc.cast(table.column(c), pa.int64()).fill_null(0).to_numpy())
    return {c: np.concatenate(v) for c, v in parts.items()}, table_version


def _key_vocab(spec: FeatureSpec, key: str) -> int:
    return spec.sparse_vocab[spec.sparse_fields.index(key)]


def node_table(spec: FeatureSpec, group: str, seen: np.ndarray, modes: dict[str, np.ndarray]) -> NodeTable:
    """Assemble a :class:`NodeTable` from ``seen`` [N] (node has train rows) and each non-key
    field's modal value per node ``modes[field]`` [N] (-1 where unknown)."""
    key = key_field(spec, group)
    fields = graph_fields(spec, group)
    n = _key_vocab(spec, key)
    node_fields = np.zeros((n, len(fields)), np.int64)  # [N, M]
    for j, name in enumerate(fields):
        node_fields[:, j] = np.arange(n) if name == key else np.maximum(modes[name], 0)
    searchable = seen.astype(bool).copy()
    searchable[0] = False
    node_fields[0] = 0
    return NodeTable(group, key, fields, node_fields, searchable)


def node_table_numpy(spec: FeatureSpec, group: str, columns: dict[str, np.ndarray]) -> NodeTable:
    """Modal field values of every node of ``group`` from the train rows in ``columns``.

    Raises:
        ValueError: a key index outside the key field's vocabulary (names the field).
    """
    key = key_field(spec, group)
    n = _key_vocab(spec, key)
    keys = columns[key]
    if keys.size and (keys.min() < 0 or keys.max() >= n):
        raise ValueError(f"features column '{key}' has indices {keys.min()}..{keys.max()}, "
                         f"expected 0..{n - 1} (vocab_size in the manifest)")
    seen = np.zeros(n, bool)
    seen[keys] = True
    modes = {f: modal_values(keys, columns[f], n) for f in graph_fields(spec, group) if f != key}
    return node_table(spec, group, seen, modes)


def modal_frame_spark(df: Any, key: str, fields: Sequence[str]) -> Any:
    """Spark version of :func:`modal_values`: one row per key of ``df`` (train rows) with each
    field's mode under the same rule (non-missing first, then count, then smallest index)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    out = df.select(key).distinct()
    for name in fields:
        if name == key:
            continue
        counts = df.groupBy(key, name).count()
        rank = Window.partitionBy(key).orderBy((F.col(name) == 0).asc(), F.col("count").desc(), F.col(name).asc())
        mode = counts.withColumn("_r", F.row_number().over(rank)).where("_r = 1").select(key, name)
        out = out.join(mode, key, "left")
    return out


def node_table_spark(spec: FeatureSpec, group: str, train_df: Any) -> NodeTable:
    """:func:`node_table_numpy` with the grouping done in Spark (``train_df``: the train rows);
    only the per-node result (N rows) comes to the driver."""
    key = key_field(spec, group)
    n = _key_vocab(spec, key)
    fields = [f for f in graph_fields(spec, group) if f != key]
    frame = modal_frame_spark(train_df, key, [key, *fields]).toPandas()
    nodes = frame[key].to_numpy(np.int64)
    if nodes.size and (nodes.min() < 0 or nodes.max() >= n):
        raise ValueError(f"features column '{key}' has indices {nodes.min()}..{nodes.max()}, expected 0..{n - 1}")
    seen = np.zeros(n, bool)
    seen[nodes] = True
    modes = {}
    for f in fields:
        modes[f] = np.full(n, -1, np.int64)
        modes[f][nodes] = frame[f].fillna(-1).to_numpy(np.int64)
    return node_table(spec, group, seen, modes)


def embedding_offsets(spec: FeatureSpec) -> np.ndarray:
    """Row offset of each field (``spec.all_fields`` order) in an EmbeddingArch table."""
    sizes = list(spec.sparse_vocab) + list(spec.multi_vocab)
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)


def representations(table: np.ndarray, spec: FeatureSpec, nodes: NodeTable) -> np.ndarray:
    """e = concat of the field embeddings of every node's values: [N, M*D] float32.

    Raises:
        ValueError: the table's row count is not the spec's total vocabulary size.
    """
    total = sum(spec.sparse_vocab) + sum(spec.multi_vocab)
    if table.ndim != 2 or table.shape[0] != total:
        raise ValueError(f"embedding table has shape {table.shape}, expected [{total}, D] "
                         "(one row per index of every field of the manifest)")
    cols = np.array([spec.all_fields.index(f) for f in nodes.fields], np.int64)  # [M]
    rows = embedding_offsets(spec)[cols][None, :] + nodes.node_fields  # [N, M]
    return table[rows].reshape(nodes.num_nodes, -1).astype(np.float32)  # [N, M*D]
