"""Graph edges (sparsify + normalise), their tables, the graph manifest, and loading for CSTWA.

Layout of the graph folder (``graph.output``)::

    user_graph/  item_graph/   edges: src, dst (long node ids), weight (Â, float), similarity (A)
    user_nodes/  item_nodes/   node (long) + one int32 column per graph field: StructureGraph.node_fields
    graph_manifest.json        written last, atomically: every published graph version

Each table is written with :func:`cvr_spark.tables.write_table` (Delta or versioned Parquet),
so every refresh adds a table version. A *graph version* is one complete refresh; the
manifest maps it to the four table versions (``versions[str(v)]``) and names the current
one (``current``). A refresh that fails before the manifest is replaced may leave newer
table versions behind, but readers go through the manifest, so they keep reading the last
complete refresh; older graph versions stay readable (time travel / ``v=<N>`` folders).

``similarity`` holds A = max(S, 0) on the kept top-K entries, ``weight`` holds
Â = D^-1/2 A D^-1/2 (``normalization='sym'``, :func:`normalize_adjacency`) or A itself
(``'none'``). Zero entries of A are not stored (a sparse zero).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from cvr_spark.graph.represent import NodeTable
from cvr_spark.models.base import FeatureSpec
from cvr_spark.models.cstwa_graph import StructureGraph, graph_fields, normalize_adjacency
from cvr_spark.tables import parquet_files, write_json_atomic, write_table

MANIFEST = "graph_manifest.json"
NORMALIZATIONS = ("sym", "none")
GROUPS = ("user", "item")
EDGE_ROWS_PER_FILE = 5_000_000


@dataclass
class GraphEdges:
    """One graph's non-zero entries, sorted by (src, dst): arrays [E]."""

    src: np.ndarray
    dst: np.ndarray
    weight: np.ndarray
    similarity: np.ndarray
    num_nodes: int


def build_edges(nodes: NodeTable, reps: np.ndarray, knn: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
                normalization: str = "sym") -> GraphEdges:
    """Search the searchable nodes with ``knn`` (vectors [n, C] -> (pos [n, K], sim [n, K])),
    drop negatives (S <- max(S, 0)), keep the top-K entries, normalise.

    Raises:
        ValueError: unknown normalisation or ``reps`` not [N, C] for the node table.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"graph.normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if reps.shape[0] != nodes.num_nodes:
        raise ValueError(f"{len(reps)} representations for {nodes.num_nodes} {nodes.group} nodes")
    ids = np.flatnonzero(nodes.searchable)  # [n] node ids of the searched rows
    pos, sim = knn(reps[ids])  # [n, K] each
    src = np.repeat(ids, pos.shape[1])  # [n*K]
    dst = ids[pos.ravel()] if pos.size else np.zeros(0, np.int64)
    a = np.maximum(sim.ravel(), 0.0).astype(np.float32)  # [n*K]
    keep = a > 0
    src, dst, a = src[keep], dst[keep], a[keep]
    order = np.lexsort((dst, src))
    src, dst, a = src[order], dst[order], a[order]
    n = nodes.num_nodes
    if normalization == "none":
        return GraphEdges(src, dst, a.copy(), a, n)
    adj = normalize_adjacency(torch.from_numpy(np.stack([src, dst])), torch.from_numpy(a), n)
    idx = adj.indices().numpy()
    if not (np.array_equal(idx[0], src) and np.array_equal(idx[1], dst)):
        raise RuntimeError("normalised adjacency lost or reordered entries (duplicate edges?)")
    return GraphEdges(src, dst, adj.values().numpy().astype(np.float32), a, n)


# ------------------------------------------------------------------ publishing

def _frame(spark: Any, columns: dict[str, np.ndarray]) -> Any:
    """A Spark DataFrame from numpy columns (through Arrow)."""
    import pandas as pd

    key = "spark.sql.execution.arrow.pyspark.enabled"
    before = spark.conf.get(key, "false")
    spark.conf.set(key, "true")
    try:
        return spark.createDataFrame(pd.DataFrame(columns))
    finally:
        spark.conf.set(key, before)


def _write(spark: Any, columns: dict[str, np.ndarray], path: Path, fmt: str) -> int:
    rows = len(next(iter(columns.values())))
    files = math.ceil(rows / EDGE_ROWS_PER_FILE)
    df = _frame(spark, columns)
    if files <= 1:  # one file without a shuffle
        return write_table(df.coalesce(1), path, fmt)
    return write_table(df, path, fmt, num_files=files)


def publish_group(spark: Any, out_dir: Path, nodes: NodeTable, edges: GraphEdges, fmt: str) -> dict:
    """Write ``<group>_nodes`` then ``<group>_graph``; returns the group's manifest entry."""
    node_cols = {"node": np.arange(nodes.num_nodes, dtype=np.int64),
                 **{f: nodes.node_fields[:, j].astype(np.int32) for j, f in enumerate(nodes.fields)}}
    edge_cols = {"src": edges.src.astype(np.int64), "dst": edges.dst.astype(np.int64),
                 "weight": edges.weight.astype(np.float32), "similarity": edges.similarity.astype(np.float32)}
    tables = {}
    for kind, cols in (("nodes", node_cols), ("graph", edge_cols)):
        name = f"{nodes.group}_{kind}"
        tables[kind] = {"path": name, "format": fmt, "version": _write(spark, cols, out_dir / name, fmt)}
    return {"key_field": nodes.key_field, "fields": list(nodes.fields), "num_nodes": nodes.num_nodes,
            "searched_nodes": int(nodes.searchable.sum()), "edges": int(edges.src.size), "tables": tables}


def read_manifest(graph_dir: str | Path) -> dict:
    """The graph manifest (``{"current": v, "versions": {...}}``); empty if none yet.

    Raises:
        ValueError: the file is not valid JSON (names line and column).
    """
    path = Path(graph_dir) / MANIFEST
    if not path.is_file():
        return {"current": None, "versions": {}}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno} column {e.colno}: invalid JSON ({e.msg})") from None


def commit_version(graph_dir: str | Path, entry: dict) -> dict:
    """Add ``entry`` as the next graph version and make it current (atomic manifest replace)."""
    manifest = read_manifest(graph_dir)
    versions = manifest.get("versions") or {}
    version = max((int(v) for v in versions), default=-1) + 1
    versions[str(version)] = {**entry, "graph_version": version}
    write_json_atomic(Path(graph_dir) / MANIFEST, {"current": version, "versions": versions})
    return versions[str(version)]


# ------------------------------------------------------------------ loading

def _read_table(graph_dir: Path, info: dict, columns: list[str]) -> dict[str, np.ndarray]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(info["path"])
    path = path if path.is_absolute() else graph_dir / path
    files = [f.removeprefix("file://") for f in parquet_files(path, info["format"], info["version"])]
    if not files:
        return {c: np.zeros(0) for c in columns}
    table = pa.concat_tables([pq.read_table(f, columns=columns) for f in files])
    return {c: table.column(c).to_numpy() for c in columns}


def graph_entry(graph_dir: str | Path, version: Optional[int] = None) -> dict:
    """The manifest entry of graph ``version`` (default: the current one).

    Raises:
        FileNotFoundError: no graph published there. KeyError: no such version (lists them).
    """
    manifest = read_manifest(graph_dir)
    if manifest.get("current") is None:
        raise FileNotFoundError(f"no graph published in {graph_dir} (no {MANIFEST}): run the graph job")
    version = manifest["current"] if version is None else int(version)
    if str(version) not in manifest["versions"]:
        raise KeyError(f"{Path(graph_dir) / MANIFEST}: no graph version {version} "
                       f"(published: {sorted(int(v) for v in manifest['versions'])})")
    return manifest["versions"][str(version)]


def load_group(graph_dir: str | Path, entry: dict, group: str, spec: FeatureSpec) -> StructureGraph:
    """One group's graph of a manifest entry as a StructureGraph (sparse COO Â + node_fields).

    Raises:
        ValueError: the graph was built for other fields / vocabulary than ``spec``.
    """
    info = entry[group]
    fields = graph_fields(spec, group)
    key = spec.user_key_field if group == "user" else spec.item_key_field
    n = spec.sparse_vocab[spec.sparse_fields.index(key)] if key in spec.sparse_fields else None
    if info["fields"] != fields or info["num_nodes"] != n:
        raise ValueError(f"{Path(graph_dir) / MANIFEST} v{entry['graph_version']}: {group} graph built for fields "
                         f"{info['fields']} with {info['num_nodes']} nodes; the spec has {fields} with {n} "
                         f"'{key}' indices: rebuild the graph on these features")
    edges = _read_table(Path(graph_dir), info["tables"]["graph"], ["src", "dst", "weight"])
    nodes = _read_table(Path(graph_dir), info["tables"]["nodes"], ["node", *fields])
    order = np.argsort(nodes["node"], kind="stable")
    if not np.array_equal(nodes["node"][order], np.arange(n)):
        raise ValueError(f"{group}_nodes table: expected one row per node 0..{n - 1}")
    node_fields = np.stack([nodes[f][order].astype(np.int64) for f in fields], 1)  # [N, M]
    idx = torch.from_numpy(np.stack([edges["src"], edges["dst"]]).astype(np.int64))  # [2, E]
    adj = torch.sparse_coo_tensor(idx, torch.from_numpy(edges["weight"].astype(np.float32)), (n, n),
                                  check_invariants=True)  # indices read from a table: validate
    return StructureGraph(adj.coalesce(), torch.from_numpy(node_fields))


def load_structure_graphs(graph_dir: str | Path, spec: FeatureSpec,
                          version: Optional[int] = None) -> tuple[StructureGraph, StructureGraph]:
    """The (user, item) graphs of graph ``version`` (default: current) for ``CSTWA.set_graphs``.

    Reads the pinned table versions named by the manifest with pyarrow (no Spark).

    Raises:
        FileNotFoundError / KeyError: nothing published / no such version.
        ValueError: the graphs do not fit ``spec``.
    """
    entry = graph_entry(graph_dir, version)
    user, item = (load_group(graph_dir, entry, g, spec) for g in GROUPS)
    return user, item
