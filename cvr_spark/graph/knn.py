"""Exact cosine top-K with FAISS (MODELS.md §9.4 steps 2-4), locally or in Spark.

Shape letters: N nodes in the search, Q queries in a block, C = M*D representation width,
K neighbours kept per node.

* Vectors are L2-normalised float32 and searched in an ``IndexFlatIP`` (exact inner product =
  cosine). A zero vector stays zero: its similarity to everything is 0.
* :func:`search_block` is the one place where self loops are handled, for both paths:
  ``include_self=True`` keeps the node among its K (K-1 neighbours + self; if ties pushed
  self out of FAISS's K, self replaces the last one); ``include_self=False`` searches K+1 and
  drops self (or, if ties pushed self out, the last one). Rows are ordered by (-similarity,
  node position), so equal inputs give equal edges whatever order FAISS returned ties in.
* Local (:func:`knn_local`): query blocks of ``batch_size`` rows against one index (memory
  bounded by the index plus a [Q, K] result block); on a GPU when ``faiss.get_num_gpus() > 0``
  and the installed faiss has GPU support (``device='auto'``), else on CPU.
* Spark (:func:`knn_spark`): the normalised matrix is broadcast, every executor builds the
  same index once per Python worker, and ``mapInPandas`` searches each partition's range of
  query positions. The [N, K] result comes back to the driver (it is small next to the
  O(N^2 C) search); use it when one machine's cores are too slow for the search.
"""
from __future__ import annotations

import logging
import uuid
from typing import Any, Iterator

import numpy as np

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "gpu")


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Contiguous float32 copy of ``x`` [N, C] with unit L2 rows (zero rows stay zero).

    Raises:
        ValueError: ``x`` is not 2-D or holds non-finite values.
    """
    if x.ndim != 2:
        raise ValueError(f"representations must be a 2-D array [N, C], got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError("representations hold NaN or inf values (is the embedding table finite?)")
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # [N, 1]
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)


def use_gpu(device: str) -> bool:
    """Whether FAISS should search on a GPU for ``device`` (auto / cpu / gpu).

    Raises:
        ValueError: unknown device name. RuntimeError: ``gpu`` asked for but none is usable.
    """
    faiss = import_faiss()
    if device not in DEVICES:
        raise ValueError(f"graph.device must be one of {DEVICES}, got {device!r}")
    available = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if device == "gpu" and not available:
        raise RuntimeError("graph.device=gpu but faiss sees no GPU (install faiss-gpu, check CUDA)")
    return device != "cpu" and available


def import_faiss() -> Any:
    """The ``faiss`` module. Raises ImportError naming the extras that bring it."""
    try:
        import faiss
    except ImportError as e:
        raise ImportError("the graph job needs FAISS: pip install 'cvr-spark[cpu]' (faiss-cpu) or "
                          "'cvr-spark[gpu]' (faiss-gpu-cu12), one of the two") from e
    return faiss


def build_index(vectors: np.ndarray, gpu: bool = False) -> Any:
    """An exact inner-product index over normalised ``vectors`` [N, C] (on GPU 0 if ``gpu``)."""
    faiss = import_faiss()

    index = faiss.IndexFlatIP(vectors.shape[1])
    if gpu:
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, 0, index)
        index.referenced_resources = resources  # keep the resources alive with the index
    index.add(vectors)
    return index


def search_block(index: Any, queries: np.ndarray, self_pos: np.ndarray, k: int,
                 include_self: bool) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of ``queries`` [Q, C] in ``index``, with self loops handled per ``include_self``.

    Args:
        self_pos: [Q] position of each query's own vector in the index.

    Returns:
        (pos [Q, K'], sim [Q, K']) with K' = min(k, index size) (one fewer when self is
        excluded and the index is smaller than k+1); rows sorted by (-sim, pos).
    """
    wanted = min(k + (0 if include_self else 1), int(index.ntotal))
    if wanted == 0 or len(queries) == 0:
        return np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32)
    sim, pos = index.search(queries, wanted)  # [Q, W] each
    is_self = pos == self_pos[:, None]  # [Q, W]
    has_self = is_self.any(1)  # [Q]
    if include_self:
        missing = ~has_self
        pos[missing, -1] = self_pos[missing]
        sim[missing, -1] = np.einsum("qc,qc->q", queries[missing], queries[missing])
    else:
        keep = ~is_self
        keep[~has_self, -1] = False  # exactly one column dropped per row
        pos = pos[keep].reshape(len(queries), wanted - 1)  # [Q, W-1]
        sim = sim[keep].reshape(len(queries), wanted - 1)  # [Q, W-1]
    order = np.lexsort((pos, -sim), axis=-1)  # [Q, K']
    return np.take_along_axis(pos, order, 1).astype(np.int64), np.take_along_axis(sim, order, 1)


def knn_local(vectors: np.ndarray, k: int, include_self: bool = True, batch_size: int = 16384,
              device: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k of every row of ``vectors`` [N, C] among all rows (batched queries).

    Returns:
        (pos [N, K'], sim [N, K']): neighbour positions into ``vectors`` and cosine similarities.

    Raises:
        ValueError: k < 1 or batch_size < 1 (and see :func:`normalize_rows`, :func:`use_gpu`).
    """
    if k < 1 or batch_size < 1:
        raise ValueError(f"k and batch_size must be >= 1, got k={k}, batch_size={batch_size}")
    x = normalize_rows(vectors)  # [N, C]
    gpu = use_gpu(device)
    index = build_index(x, gpu)
    pos_parts, sim_parts = [], []
    for start in range(0, len(x), batch_size):
        stop = min(start + batch_size, len(x))
        p, s = search_block(index, x[start:stop], np.arange(start, stop), k, include_self)
        pos_parts.append(p)
        sim_parts.append(s)
    width = pos_parts[0].shape[1] if pos_parts else 0
    log.info("knn: %d nodes x %d dims, k=%d on %s", len(x), x.shape[1], k, "GPU" if gpu else "CPU")
    return (np.concatenate(pos_parts) if pos_parts else np.zeros((0, width), np.int64),
            np.concatenate(sim_parts) if sim_parts else np.zeros((0, width), np.float32))


_WORKER_INDEX: dict[str, Any] = {}  # search token -> index, one per Python worker process


def _partition_search(bc: Any, token: str, k: int, include_self: bool, batch_size: int):
    """The ``mapInPandas`` function: each input frame holds query positions (column ``pos``)."""

    def search(frames: Iterator[Any]) -> Iterator[Any]:
        import pandas as pd

        x = bc.value
        if token not in _WORKER_INDEX:
            _WORKER_INDEX.clear()
            _WORKER_INDEX[token] = build_index(x, gpu=False)
        index = _WORKER_INDEX[token]
        for frame in frames:
            rows = frame["pos"].to_numpy(np.int64)
            for start in range(0, len(rows), batch_size):
                q = rows[start:start + batch_size]  # [Q]
                pos, sim = search_block(index, x[q], q, k, include_self)  # [Q, K'] each
                yield pd.DataFrame({"src": np.repeat(q, pos.shape[1]), "dst": pos.ravel(),
                                    "similarity": sim.ravel().astype(np.float32)})

    return search


def knn_spark(spark: Any, vectors: np.ndarray, k: int, include_self: bool = True,
              batch_size: int = 16384, partitions: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """:func:`knn_local`'s result computed on Spark executors (CPU FAISS on each).

    Args:
        partitions: query partitions (0: ``spark.default.parallelism``).
    """
    if k < 1 or batch_size < 1:
        raise ValueError(f"k and batch_size must be >= 1, got k={k}, batch_size={batch_size}")
    x = normalize_rows(vectors)  # [N, C]
    n = len(x)
    parts = partitions or spark.sparkContext.defaultParallelism
    bc = spark.sparkContext.broadcast(x)
    try:
        queries = spark.range(0, n, numPartitions=max(1, min(parts, n))).withColumnRenamed("id", "pos")
        search = _partition_search(bc, uuid.uuid4().hex, k, include_self, batch_size)
        found = queries.mapInPandas(search,
                                    "src long, dst long, similarity float").toPandas()
    finally:
        bc.unpersist()
    width = min(k + (0 if include_self else 1), n) - (0 if include_self else 1)
    width = max(width, 0)
    found = found.sort_values("src", kind="stable")  # rows arrive per partition; keep in-row order
    if len(found) != n * width:
        raise RuntimeError(f"spark knn returned {len(found)} edges, expected {n} nodes x {width}")
    pos = found["dst"].to_numpy(np.int64).reshape(n, width)  # [N, K']
    sim = found["similarity"].to_numpy(np.float32).reshape(n, width)  # [N, K']
    return pos, sim
