"""The graph job: CTR embeddings -> node representations -> FAISS top-K -> graph tables.

:func:`run_graph` is the whole refresh (daily schedule friendly):

1. Embeddings: ``ctr_checkpoint`` (a run folder of the shared loop, or any checkpoint with an
   EmbeddingArch table), else pre-train the ``ctr`` model into ``pretrain.out`` (default
   ``<output>/pretrain/features_v<version>``: a finished run there is reused, not retrained).
2. Nodes: modal field values per user / item over the train split (numpy or Spark).
3. Exact cosine top-K per group (FAISS, locally or on Spark executors), max(S, 0), normalise.
4. Publish ``user_nodes``, ``user_graph``, ``item_nodes``, ``item_graph``, then the manifest.

**Idempotence.** The same inputs (embedding table bytes, features-table version, fields,
K / include_self / normalisation) give the same edges. Their SHA-256 fingerprint is stored
with each graph version; a refresh whose fingerprint equals the current version's writes
nothing and returns that version (``skipped: true``); ``force=true`` writes a new version anyway.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from cvr_spark.config import SparkConfig
from cvr_spark.graph import knn as knn_mod
from cvr_spark.graph.pretrain import EmbeddingSource, PretrainConfig, load_embeddings, pretrain_ctr
from cvr_spark.graph.represent import (GROUPS, NodeTable, key_field, node_table_numpy, node_table_spark,
                                       read_train_columns, representations)
from cvr_spark.graph.store import NORMALIZATIONS, build_edges, commit_version, publish_group, read_manifest
from cvr_spark.models.base import FeatureSpec
from cvr_spark.models.cstwa_graph import graph_fields

log = logging.getLogger(__name__)

KNN_BACKENDS = ("auto", "local", "spark")


@dataclass
class GraphConfig:
    """The graph job's options (``graph:`` block of ``conf/graph.yaml``)."""

    data: str = ""  # feature job output (manifest.json + features table)
    output: str = ""  # graph folder (tables + graph_manifest.json)
    ctr_checkpoint: str = ""  # run folder / checkpoint file; empty: pre-train (see ``pretrain``)
    embedding_key: str = ""  # state-dict key of the table; empty: the only (or the CTR) EmbeddingArch table
    k: int = 8  # top-K per node [P]
    include_self: bool = True  # [I] self kept among the K (K-1 neighbours + self), as LATTICE
    normalization: str = "sym"  # sym: D^-1/2 A D^-1/2 (row degrees) [P form]; none: A
    format: str = "delta"
    knn_backend: str = "auto"  # local | spark | auto (spark above spark_min_nodes)
    spark_min_nodes: int = 5_000_000
    spark_partitions: int = 0  # query partitions of the Spark search (0: default parallelism)
    query_batch: int = 16384  # queries per FAISS search call (bounds memory: batch x K results)
    device: str = "auto"  # FAISS on auto | cpu | gpu
    modal_backend: str = "numpy"  # numpy (pyarrow columns on the driver) | spark (groupBy)
    features_version: Optional[int] = None  # pin the features table (default: the manifest's)
    allow_version_mismatch: bool = False  # accept embeddings trained on another features version
    force: bool = False  # write a new graph version even if the inputs are unchanged
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    def check(self) -> None:
        """Raise a ValueError naming the key of the first bad option."""
        checks = [
            (bool(self.data), "graph.data: the feature job's output folder is required"),
            (bool(self.output), "graph.output: the graph folder is required"),
            (self.k >= 1, f"graph.k: expected >= 1, got {self.k}"),
            (self.normalization in NORMALIZATIONS,
             f"graph.normalization: expected one of {NORMALIZATIONS}, got {self.normalization!r}"),
            (self.format in ("delta", "parquet"), f"graph.format: expected delta or parquet, got {self.format!r}"),
            (self.knn_backend in KNN_BACKENDS, f"graph.knn_backend: expected one of {KNN_BACKENDS}, got {self.knn_backend!r}"),
            (self.device in knn_mod.DEVICES, f"graph.device: expected one of {knn_mod.DEVICES}, got {self.device!r}"),
            (self.modal_backend in ("numpy", "spark"), f"graph.modal_backend: expected numpy or spark, got {self.modal_backend!r}"),
            (self.query_batch >= 1, f"graph.query_batch: expected >= 1, got {self.query_batch}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass
class GraphJobConfig:
    """Schema of ``conf/graph.yaml`` for :func:`cvr_spark.config.load_config`."""

    spark: SparkConfig = field(default_factory=SparkConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)


def _embeddings(cfg: GraphConfig, spec: FeatureSpec, version: Optional[int]) -> EmbeddingSource:
    """Load (or pre-train, then load) the CTR embedding table; check its features version."""
    ckpt = cfg.ctr_checkpoint
    if not ckpt:
        out = cfg.pretrain.out or str(Path(cfg.output) / "pretrain" / f"features_v{version}")
        ckpt = str(pretrain_ctr(cfg.data, out, cfg.pretrain, version))
    emb = load_embeddings(ckpt, spec, cfg.embedding_key)
    trained = emb.train_table_version
    if trained is not None and version is not None and trained != version and not cfg.allow_version_mismatch:
        raise ValueError(f"{emb.source}: embeddings trained on features version {trained}, the graph reads "
                         f"version {version}; re-train, pin graph.features_version, or set "
                         "graph.allow_version_mismatch=true")
    return emb


def _node_tables(spark: Any, cfg: GraphConfig, spec: FeatureSpec, manifest: dict,
                 version: Optional[int]) -> dict[str, NodeTable]:
    if cfg.modal_backend == "spark":
        from pyspark.sql import functions as F

        from cvr_spark.tables import read_table

        info = (manifest.get("tables") or {}).get("features") or {}
        path = Path(info.get("path") or "features")
        path = path if path.is_absolute() else Path(cfg.data) / path
        train = read_table(spark, path, info.get("format") or "delta", version).where(F.col("split") == "train")
        return {g: node_table_spark(spec, g, train) for g in GROUPS}
    columns = list(dict.fromkeys(f for g in GROUPS for f in graph_fields(spec, g)))
    data, _ = read_train_columns(cfg.data, manifest, columns, version)
    return {g: node_table_numpy(spec, g, data) for g in GROUPS}


def _searcher(spark: Any, cfg: GraphConfig):
    def search(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        backend = cfg.knn_backend
        if backend == "auto":
            backend = "spark" if len(vectors) > cfg.spark_min_nodes else "local"
        if backend == "spark":
            return knn_mod.knn_spark(spark, vectors, cfg.k, cfg.include_self, cfg.query_batch, cfg.spark_partitions)
        return knn_mod.knn_local(vectors, cfg.k, cfg.include_self, cfg.query_batch, cfg.device)

    return search


def fingerprint(emb: EmbeddingSource, version: Optional[int], spec: FeatureSpec, cfg: GraphConfig) -> str:
    """SHA-256 of everything the edges depend on (see the module docstring)."""
    inputs = {"embedding": emb.checksum, "features_version": version, "data": str(Path(cfg.data).resolve()),
              "fields": {g: graph_fields(spec, g) for g in GROUPS}, "keys": {g: key_field(spec, g) for g in GROUPS},
              "vocab": list(spec.sparse_vocab), "k": cfg.k, "include_self": cfg.include_self,
              "normalization": cfg.normalization}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def run_graph(spark: Any, cfg: GraphConfig) -> dict:
    """Build and publish the user and item graphs; returns the published manifest entry.

    Returns:
        The graph version's entry (``graph_version``, ``fingerprint``, ``k``, ``include_self``,
        ``normalization``, ``embedding``, ``features``, ``user`` / ``item`` with table versions)
        plus ``skipped`` (True when unchanged inputs left the current version in place).

    Raises:
        ValueError: bad options or inputs (names the key / file). A failure while publishing
            leaves the previous graph version current and readable.
    """
    from cvr_spark.train.loader import load_manifest

    cfg.check()
    manifest = load_manifest(cfg.data)
    spec = FeatureSpec.from_manifest(manifest)
    version = cfg.features_version
    if version is None:
        version = ((manifest.get("tables") or {}).get("features") or {}).get("version")
    emb = _embeddings(cfg, spec, version)
    stamp = fingerprint(emb, version, spec, cfg)
    current = read_manifest(cfg.output)
    if not cfg.force and current.get("current") is not None:
        entry = current["versions"][str(current["current"])]
        if entry.get("fingerprint") == stamp:
            log.info("graph inputs unchanged (fingerprint %s): version %s kept", stamp[:12], current["current"])
            return {**entry, "skipped": True}
    nodes = _node_tables(spark, cfg, spec, manifest, version)
    search = _searcher(spark, cfg)
    built = {}
    for group in GROUPS:
        reps = representations(emb.table, spec, nodes[group])  # [N, M*D]
        built[group] = build_edges(nodes[group], reps, search, cfg.normalization)
    out = Path(cfg.output)
    groups = {g: publish_group(spark, out, nodes[g], built[g], cfg.format) for g in GROUPS}
    entry = {"created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "fingerprint": stamp,
             "k": cfg.k, "include_self": cfg.include_self, "normalization": cfg.normalization,
             "embedding": emb.describe(), "features": {"data": str(cfg.data), "version": version},
             "config": {k: v for k, v in asdict(cfg).items() if k != "pretrain"}, **groups}
    return {**commit_version(out, entry), "skipped": False}


# ------------------------------------------------------------------ command line

def add_graph_arguments(p: argparse.ArgumentParser) -> None:
    """The graph job's flags (shorthands for ``graph.*`` overrides) plus --config / overrides."""
    p.add_argument("--data", help="feature job output folder (manifest.json + features table)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--ctr-checkpoint", dest="ctr_checkpoint", help="CTR run folder or checkpoint file")
    src.add_argument("--pretrain", action="store_true", help="pre-train the ctr model first (default)")
    p.add_argument("--k", type=int)
    p.add_argument("--output", help="graph folder (user_graph, item_graph, graph_manifest.json)")
    p.add_argument("--force", action="store_true", default=None, help="write a new version even if unchanged")
    p.add_argument("--config", action="append", default=[], help="YAML config file (repeatable)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. graph.include_self=false")


def config_from_args(args: argparse.Namespace) -> GraphJobConfig:
    """Defaults < --config files < flags < dotted overrides.

    Raises:
        cvr_spark.config.ConfigError: unknown key or bad value (names it).
    """
    from cvr_spark.config import load_config

    flags = [f"graph.{n}={getattr(args, n)}" for n in ("data", "output", "k", "ctr_checkpoint", "force")
             if getattr(args, n, None) is not None]
    if getattr(args, "pretrain", False):
        flags.append("graph.ctr_checkpoint=''")
    return load_config(args.config, flags + list(args.overrides), schema=GraphJobConfig)


def cmd_graph(args: argparse.Namespace) -> int:
    """Run the graph job per parsed arguments (``cvr-spark graph``); prints the entry as JSON.

    Raises:
        cvr_spark.config.ConfigError: unknown key or bad value (names it).
    """
    from cvr_spark.spark import get_spark

    cfg = config_from_args(args)
    print(json.dumps(run_graph(get_spark(cfg.spark), cfg.graph), indent=2, default=str))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``build_graph`` entry point: parse, start / reuse Spark, run, print the entry as JSON."""
    from cvr_spark.config import ConfigError

    parser = argparse.ArgumentParser(prog="build_graph", description=__doc__.splitlines()[0])
    add_graph_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return cmd_graph(args)
    except ConfigError as e:
        print(f"build_graph: config error: {e}", file=sys.stderr)
        return 2
