"""Run the training loop on N processes with Spark's ``TorchDistributor``.

The hand-off from Spark to torch is :func:`train_worker`, a module-level function that takes
one ``job`` dict of plain values (strings, numbers, paths, nested dicts of those), imports torch
inside and reads its rank from the environment torchrun sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``). Every rank reads its own shard of the features table, trains the same DDP
model (NCCL on GPUs, gloo on CPU) and returns the run folder, which is fixed before launch,
so the driver gets the same answer whichever rank's return value TorchDistributor keeps.
Rank 0 alone writes ``checkpoint.pt``, ``config.json`` and ``metrics.json``.

Under ``local_mode=False`` the run folder must be on storage every executor can reach
(DBFS, a shared volume): rank 0 writes there and the driver reads from it afterwards.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

JOB_KEYS = ("data_dir", "model", "seed", "out_dir", "model_options", "train")


def gather_objects(obj: Any, rank: int, world_size: int) -> Optional[list]:
    """Every rank's ``obj`` as a list on rank 0 (None on the other ranks); a collective."""
    import torch.distributed as dist

    out = [None] * world_size if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj: Any, rank: int) -> Any:
    """Rank 0's ``obj`` on every rank; a collective."""
    import torch.distributed as dist

    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(values: Sequence[float], device: Any) -> list[float]:
    """Element-wise sum of ``values`` over every rank (float64; on ``device`` for NCCL)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def merge_predictions(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate per-rank prediction dicts (keys common to every part, rank order).

    Raises:
        ValueError: the parts do not share their keys.
    """
    keys = set(parts[0])
    for r, p in enumerate(parts[1:], 1):
        if set(p) != keys:
            raise ValueError(f"rank {r} predicted keys {sorted(p)}, rank 0 {sorted(keys)}")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def spec_to_dict(spec: Any) -> dict:
    """A FeatureSpec as plain lists / dicts (JSON and ``weights_only`` safe)."""
    d = dataclasses.asdict(spec)
    return {k: (list(v) if isinstance(v, tuple) else dict(v) if isinstance(v, Mapping) else v)
            for k, v in d.items()}


def spec_from_dict(d: Mapping[str, Any]) -> Any:
    """Inverse of :func:`spec_to_dict`."""
    from cvr_spark.models.base import FeatureSpec

    return FeatureSpec(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


def check_job(job: Mapping[str, Any]) -> None:
    """Raise a ValueError naming the key when ``job`` lacks a key or holds a non-plain value."""
    missing = [k for k in JOB_KEYS if k not in job]
    if missing:
        raise ValueError(f"training job lacks key(s) {missing}; expected {list(JOB_KEYS)}")

    def walk(value: Any, where: str) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, f"{where}.{k}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]")
        elif not isinstance(value, (str, int, float, bool, type(None))):
            raise ValueError(f"training job key '{where}' is a {type(value).__name__}; "
                             "expected plain values (str, int, float, bool, None, lists, dicts)")

    walk(dict(job), "job")


def graph_dir_for(data_dir: str | Path, graph_dir: Optional[str | Path] = None) -> Path:
    """Where a run's graphs live: ``graph_dir`` if given, else ``<data_dir>/graphs`` (the
    folder ``cvr-spark demo`` and the README's examples give the graph job's ``--output``)."""
    return Path(graph_dir) if graph_dir else Path(data_dir) / "graphs"


def needs_graphs(model_options: Mapping[str, Any]) -> bool:
    """Whether a model with these options reads user/item graphs (CSTWA's Structure Migrator)."""
    return bool(model_options.get("structure_migrator", False))


def pin_graph_version(graph_dir: str | Path, version: Optional[int] = None) -> int:
    """The graph version a run will read: ``version`` if given, else the current one, so that
    every rank, and the evaluation after training, read the same graphs even if a scheduled
    refresh publishes a new version meanwhile.

    Raises:
        FileNotFoundError: no graph published in ``graph_dir`` (says how to build one).
    """
    from cvr_spark.graph.store import graph_entry

    return int(graph_entry(graph_dir, version)["graph_version"])


def attach_graphs(model: Any, data_dir: str | Path, graph_dir: Optional[str | Path] = None,
                  graph_version: Optional[int] = None) -> None:
    """Give a graph-using model (CSTWA with ``structure_migrator``) its user / item graphs.

    Graphs are not in checkpoints (see ``CSTWA.set_graphs``), so training and evaluation both
    call this with the run's pinned ``graph_version`` (default: the current one). Models that
    use no graphs are left alone.

    Raises:
        FileNotFoundError: the model needs graphs and none are published in the graph folder.
        ValueError: the graphs were built on other features than the model's.
    """
    if not callable(getattr(model, "set_graphs", None)) or not getattr(model.cfg, "structure_migrator", False):
        return
    from cvr_spark.graph.store import load_structure_graphs

    where = graph_dir_for(data_dir, graph_dir)
    try:
        user, item = load_structure_graphs(where, model.spec, graph_version)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"model '{model.name}' needs user/item graphs (model.structure_migrator=true): {e}; "
                                f"build them with `cvr-spark graph --data {data_dir} --output {where}`, "
                                "or train with model.structure_migrator=false") from None
    model.set_graphs(user, item)


def run_job(job: Mapping[str, Any], rank: int = 0, world_size: int = 1) -> dict:
    """Build the model and this rank's loaders from ``job`` and train; returns ``fit``'s summary.

    The process group, if any, is already initialised. Rank 0 writes ``config.json`` before
    and ``metrics.json`` (``model``, ``seed``, ``valid``, ``history``, ``table_versions`` ...) after.
    """
    from cvr_spark.models import registry
    from cvr_spark.models.base import FeatureSpec
    from cvr_spark.train.checkpoint import seed_everything
    from cvr_spark.train.loader import load_manifest, loader_class
    from cvr_spark.train.loop import TrainConfig, fit, resolve_device, write_json

    out = Path(job["out_dir"])
    manifest = load_manifest(job["data_dir"])
    spec = FeatureSpec.from_manifest(manifest)
    cfg = TrainConfig(**{**job["train"], "seed": int(job["seed"])})
    seed_everything(int(job["seed"]))  # identical initial weights on every rank
    model = registry.build(job["model"], spec, job["model_options"])
    device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", rank)))
    attach_graphs(model.to(device), job["data_dir"], job.get("graph_dir"),  # graphs follow the model's device
                  job.get("graph_version"))
    common = dict(rank=rank, world_size=world_size, seed=int(job["seed"]), in_memory=cfg.in_memory,
                  device=device, version=job.get("version"), spec=spec)
    reader = loader_class(cfg.loader)
    train = reader(job["data_dir"], "train", model.cfg.batch_size, shuffle=True, **common)
    valid = reader(job["data_dir"], "valid", cfg.eval_batch_size, shuffle=False, **common)
    meta = {"model_name": job["model"], "model_options": dict(job["model_options"]),
            "spec": spec_to_dict(spec), "job": dict(job)}
    record = {**meta, "train": dataclasses.asdict(cfg), "world_size": world_size}
    result = fit(model, train, valid, cfg, out, rank=rank, world_size=world_size, meta=meta, record=record)
    if rank == 0:
        write_json(out / "metrics.json", {"model": job["model"], "seed": int(job["seed"]),
                                           "preset": job.get("preset"), "world_size": world_size, **result})
    return result


def train_worker(job: dict) -> str:
    """TorchDistributor's entry point on every rank: process group, training, the run folder.

    Args:
        job: plain values only (see :func:`check_job`); ``use_gpu`` picks NCCL over gloo.

    Returns:
        ``job['out_dir']`` (the same on every rank).
    """
    import torch.distributed as dist

    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    started = world_size > 1 and not dist.is_initialized()
    if started:
        dist.init_process_group(backend="nccl" if job.get("use_gpu") else "gloo")
    try:
        run_job(job, rank, world_size)
    finally:
        if started:
            dist.destroy_process_group()
    return str(job["out_dir"])


def train_distributed(job: dict, processes: int, use_gpu: bool, local_mode: bool = True) -> str:
    """Train ``job`` on ``processes`` ranks; returns the run folder (``job['out_dir']``).

    ``processes == 1`` trains in this process, without Spark. Otherwise TorchDistributor
    (``num_processes``, ``local_mode`` and ``use_gpu`` passed explicitly) runs
    :func:`train_worker` under torchrun; it needs an active SparkSession (one is started with
    :func:`cvr_spark.spark.get_spark` when none is).

    Raises:
        ValueError: ``processes < 1`` or a bad job. RuntimeError: a rank returned another path.
    """
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    job = {**job, "use_gpu": bool(use_gpu)}
    if not use_gpu:
        job["train"] = {**job.get("train", {}), "device": "cpu"}
    check_job(job)
    if processes == 1:
        run_job(job, 0, 1)
        return str(job["out_dir"])
    from pyspark.ml.torch.distributor import TorchDistributor

    from cvr_spark.spark import get_spark

    get_spark()
    distributor = TorchDistributor(num_processes=processes, local_mode=local_mode, use_gpu=bool(use_gpu))
    returned = distributor.run(train_worker, job)
    if returned is not None and str(returned) != str(job["out_dir"]):
        raise RuntimeError(f"rank returned {returned!r}, expected the run folder {job['out_dir']!r}")
    return str(job["out_dir"])
