"""Benchmark of the graph build (representations -> FAISS top-K -> max(S,0) -> normalise).

Simulated embeddings at Ali-CCP sizes (0.2M users with 9 fields x 5 dims, 0.5M items with
4 x 5) and at 1/10 of them; time and peak traced memory (tracemalloc, numpy + FAISS outputs)
and peak RSS of building both graphs, on CPU and (when FAISS sees one) on GPU, against a
dense numpy brute force on the small size. Publishing (Spark writes) is not timed.

    python benchmarks/graph.py --scale 0.1 --threads 2 --out runs/bench_graph.json
    python benchmarks/graph.py --scale 1.0 0.1 --out runs/bench_graph_full.json
"""
from __future__ import annotations

import argparse
import json
import resource
import time
import tracemalloc
from pathlib import Path

import numpy as np

from cvr_spark.graph.knn import knn_local, normalize_rows, use_gpu
from cvr_spark.graph.represent import NodeTable
from cvr_spark.graph.store import build_edges

FULL = {"user": (200_000, 9), "item": (500_000, 4)}  # nodes, fields
DIM, VOCAB, K = 5, 1000, 8


def simulate(group: str, n: int, fields: int, seed: int) -> tuple[NodeTable, np.ndarray]:
    """Nodes 0..n (0 = OOV) with random field values and their concatenated embeddings."""
    rng = np.random.default_rng(seed)
    values = rng.integers(1, VOCAB, (n + 1, fields))  # [N, M]
    values[:, 0] = np.arange(n + 1)
    tables = [rng.normal(0, 0.1, (max(VOCAB, n + 1), DIM)).astype(np.float32) for _ in range(fields)]
    reps = np.concatenate([t[values[:, j]] for j, t in enumerate(tables)], 1)  # [N, M*D]
    searchable = np.ones(n + 1, bool)
    searchable[0] = False
    return NodeTable(group, "key", [f"f{j}" for j in range(fields)], values, searchable), reps


def brute_force(x: np.ndarray, k: int, batch: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Dense numpy cosine top-k (self included), in row blocks."""
    z = normalize_rows(x)
    pos, sim = np.zeros((len(z), k), np.int64), np.zeros((len(z), k), np.float32)
    for s in range(0, len(z), batch):
        block = z[s:s + batch] @ z.T  # [Q, N]
        top = np.argpartition(-block, k - 1, axis=1)[:, :k]  # [Q, K]
        vals = np.take_along_axis(block, top, 1)
        order = np.argsort(-vals, axis=1)
        pos[s:s + batch], sim[s:s + batch] = np.take_along_axis(top, order, 1), np.take_along_axis(vals, order, 1)
    return pos, sim


def run_case(scale: float, device: str, method: str) -> dict:
    """Build both graphs; returns seconds, peak traced MiB and edges per group."""
    out = {"scale": scale, "device": device, "method": method, "groups": {}}
    total = time.perf_counter()
    tracemalloc.start()
    for seed, (group, (n, fields)) in enumerate(FULL.items()):
        nodes, reps = simulate(group, int(n * scale), fields, seed)
        t = time.perf_counter()
        search = (lambda v: brute_force(v, K)) if method == "numpy" else (lambda v: knn_local(v, K, True, device=device))
        edges = build_edges(nodes, reps, search)
        out["groups"][group] = {"nodes": nodes.num_nodes, "dims": reps.shape[1], "edges": int(edges.src.size),
                                "seconds": round(time.perf_counter() - t, 2)}
    out["peak_traced_mib"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
    tracemalloc.stop()
    out["seconds"] = round(time.perf_counter() - total, 2)
    out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, nargs="+", default=[0.1], help="fractions of the Ali-CCP sizes")
    parser.add_argument("--threads", type=int, default=2, help="FAISS / BLAS threads (target: 2 cores)")
    parser.add_argument("--brute-force-max-scale", type=float, default=0.1)
    parser.add_argument("--out", default="runs/bench_graph.json")
    args = parser.parse_args()
    import faiss
    import torch

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    results = []
    for scale in args.scale:
        devices = ["cpu"] + (["gpu"] if use_gpu("auto") else [])
        cases = [(d, "faiss") for d in devices]
        cases += [("cpu", "numpy")] if scale <= args.brute_force_max_scale else []
        for device, method in cases:
            r = run_case(scale, device, method)
            print(json.dumps(r))
            results.append(r)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": args.threads, "k": K, "results": results}, indent=2))


if __name__ == "__main__":
    main()
