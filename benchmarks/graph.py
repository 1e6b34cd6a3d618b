"""Benchmark of the graph build (representations -> FAISS top-K -> max(S,0) -> normalise).

Simulated embeddings at Ali-CCP sizes (0.2M users with 9 fields x 5 dims, 0.5M items with
4 x 5) and at fractions of them (``--scale``); time and peak traced memory (tracemalloc, numpy
+ FAISS outputs) and peak RSS of building both graphs, on CPU and (when FAISS sees one) on GPU,
against a dense numpy brute force on the small sizes (``--brute-force-max-scale``). Publishing
(Spark writes) is not timed.

Each case (scale x device x method) runs in a fresh Python subprocess
(``python graph.py --one-case SCALE DEVICE METHOD``) whose JSON line the parent collects, so
each case's ``peak_rss_mib`` (the child's ``ru_maxrss``) is its own and not an earlier, larger
case's. It includes the child's imports (numpy, FAISS, torch); ``baseline_rss_mib`` is the
child's peak RSS just before the case starts. ``--threads`` is applied in the child to FAISS,
torch and, through OMP/OPENBLAS/MKL_NUM_THREADS, to numpy's BLAS. One invocation writes every
scale's cases into one JSON file, with the git commit, command line, UTC time and machine
(``_provenance.py``):

    .venv/bin/python benchmarks/graph.py --scale 1.0 0.1 --threads 2 --out benchmarks/results/graph.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import tracemalloc

import numpy as np

from cvr_spark.graph.knn import knn_local, normalize_rows, use_gpu
from cvr_spark.graph.represent import NodeTable
from cvr_spark.graph.store import build_edges

FULL = {"user": (200_000, 9), "item": (500_000, 4)}  # nodes, fields
DIM, VOCAB, K = 5, 1000, 8
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


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


def _max_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: kB


def run_case(scale: float, device: str, method: str) -> dict:
    """Build both graphs; returns seconds, peak traced MiB and edges per group.

    ``peak_rss_mib`` is this process's peak RSS: the case's own only in a fresh process
    (:func:`run_case_subprocess`)."""
    out = {"scale": scale, "device": device, "method": method, "groups": {},
           "baseline_rss_mib": _max_rss_mib()}
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
    out["peak_rss_mib"] = _max_rss_mib()
    return out


def run_case_subprocess(scale: float, device: str, method: str, threads: int) -> dict:
    """:func:`run_case` in a fresh interpreter; its result is the last line of its stdout."""
    import _child

    env = {**os.environ, **{name: str(threads) for name in THREAD_ENV}}
    cmd = [sys.executable, os.path.abspath(__file__), "--one-case", str(scale), device, method,
           "--threads", str(threads)]
    return _child.run_json_child(cmd, f"case scale={scale} device={device} method={method}", env)


def _set_threads(threads: int) -> None:
    import faiss
    import torch

    faiss.omp_set_num_threads(threads)
    torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, nargs="+", default=[0.1], help="fractions of the Ali-CCP sizes")
    parser.add_argument("--threads", type=int, default=2, help="FAISS / torch / BLAS threads (target: 2 cores)")
    parser.add_argument("--brute-force-max-scale", type=float, default=0.1)
    parser.add_argument("--out", default="benchmarks/results/graph.json")
    parser.add_argument("--one-case", nargs=3, metavar=("SCALE", "DEVICE", "METHOD"), default=None,
                        help="internal: run one case in this process and print its JSON line")
    args = parser.parse_args()

    if args.one_case is not None:
        scale, device, method = args.one_case
        _set_threads(args.threads)
        print(json.dumps(run_case(float(scale), device, method)), flush=True)
        return

    import _provenance

    provenance = _provenance.run_info()
    devices = ["cpu"] + (["gpu"] if use_gpu("auto") else [])
    results = []
    for scale in args.scale:
        cases = [(d, "faiss") for d in devices]
        cases += [("cpu", "numpy")] if scale <= args.brute_force_max_scale else []
        for device, method in cases:
            r = run_case_subprocess(scale, device, method, args.threads)
            print(json.dumps(r), flush=True)
            results.append(r)
    payload = {"benchmark": "graph", "threads": args.threads, "k": K, "case_isolation": "subprocess",
               "provenance": provenance,
               "machine": _provenance.machine_info(("numpy", "faiss-cpu", "faiss-gpu", "torch")),
               "results": results}
    _provenance.write_result(args.out, payload)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
