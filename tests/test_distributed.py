"""Distributed training: TorchDistributor with 2 CPU processes end to end, and a 2-rank gloo DDP
run of ``fit`` showing that validation covers the whole split and that only rank 0 writes."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch

from tests.test_loop import write_features


def _store(tmp_path: Path) -> str:
    """A fresh rendezvous file for one 2-rank group (``init_method="file://..."``): unlike a
    port picked free in advance, no other process can take it before the ranks rendezvous."""
    return f"file://{tmp_path / f'rendezvous-{uuid.uuid4().hex}'}"


def _init_group(rank: int, world_size: int, store: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world_size)


def _esmm_rank(rank: int, world_size: int, data_dir: str, store: str) -> tuple:
    """Join a 2-rank gloo group and build this rank's ESMM run: (model, train and valid
    FeatureLoader shards, TrainConfig). The caller destroys the process group."""
    from cvr_spark.models import registry
    from cvr_spark.models.base import FeatureSpec
    from cvr_spark.train.loader import FeatureLoader, load_manifest
    from cvr_spark.train.loop import TrainConfig

    _init_group(rank, world_size, store)
    torch.manual_seed(0)
    spec = FeatureSpec.from_manifest(load_manifest(data_dir))
    model = registry.build("esmm", spec, registry.preset_options("esmm", "fast", {"batch_size": 150}))
    kw = dict(rank=rank, world_size=world_size, seed=0, spec=spec)
    train = FeatureLoader(data_dir, "train", 150, shuffle=True, **kw)
    valid = FeatureLoader(data_dir, "valid", 1000, shuffle=False, **kw)
    cfg = TrainConfig(epochs=2, patience=0, progress=False, num_threads=1, checkpoint_every=3)
    return model, train, valid, cfg


def _ddp_rank(rank: int, world_size: int, data_dir: str, base: str, store: str) -> None:
    """One rank: gloo group, real FeatureLoader shards, fit() into a per-rank out dir."""
    import torch.distributed as dist

    from cvr_spark.train.loop import fit

    try:
        model, train, valid, cfg = _esmm_rank(rank, world_size, data_dir, store)
        result = fit(model, train, valid, cfg, Path(base) / f"rank{rank}", rank=rank, world_size=world_size)
        digest = float(sum(p.detach().double().sum() for p in model.parameters()))
        # The test harness (not fit) records what each rank saw, outside the run folders.
        (Path(base) / f"result{rank}.json").write_text(json.dumps(
            {"valid": result["valid"], "history": result["history"], "weights": digest,
             "valid_rows": valid.total_rows, "shard_rows": valid.num_rows,
             "train_rows": train.total_rows, "train_shard": train.num_rows}, default=str))
    finally:
        if dist.is_initialized():  # init may have failed inside _esmm_rank
            dist.destroy_process_group()


def test_ddp_fit_gathers_validation_and_only_rank0_writes(tmp_path):
    import torch.multiprocessing as mp

    data = write_features(tmp_path / "data", n=2000, rows_per_group=100)
    base = tmp_path / "out"
    base.mkdir()
    mp.spawn(_ddp_rank, args=(2, str(data), str(base), _store(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((base / f"result{r}.json").read_text()) for r in (0, 1))
    assert sorted(p.name for p in (base / "rank0").iterdir()) == ["checkpoint.pt"]
    assert not (base / "rank1").exists(), "rank 1 wrote files"
    # Validation metrics are computed over the whole split (both shards), identical on both ranks.
    assert r0["shard_rows"] < r0["valid_rows"] == r0["valid"]["n_impressions"]
    same = [{k: h[k] for k in ("epoch", "train_loss", "samples", "score", "valid")} for h in r0["history"]]
    assert json.dumps(same) == json.dumps([{k: h[k] for k in same[0]} for h in r1["history"]])
    assert r0["history"][0]["samples"] == r0["train_rows"] > r0["train_shard"]  # every rank's rows
    assert r0["weights"] == r1["weights"]  # DDP keeps the replicas identical
    state = torch.load(base / "rank0" / "checkpoint.pt", weights_only=True)
    assert len(state["rng"]) == 2 and state["world_size"] == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # per-rank dropout RNG


@pytest.mark.parametrize("local_mode", [True, False], ids=["local-mode", "cluster-mode"])
def test_torch_distributor_two_cpu_processes_end_to_end(spark, tmp_path, local_mode, caplog):
    """TorchDistributor's two modes: ranks as driver processes (local mode) or as one barrier
    task each in the executors' Python workers (cluster mode, ``--no-local-mode``; on the
    ``local[2]`` test master the executor is the driver's JVM, the workers are still separate)."""
    from cvr_spark.train.experiment import run_train

    data = write_features(tmp_path / "data", n=2000, rows_per_group=100)
    out = tmp_path / "runs"
    with caplog.at_level("INFO", logger="TorchDistributor"):
        result = run_train(data, ["esmm"], [3], "fast", 2, 2, out,
                           {"train": {"progress": False, "num_threads": 1}, "model": {"batch_size": 200}},
                           use_gpu=False, local_mode=local_mode)
    started = ("Started local training with 2 processes" if local_mode
               else "Started distributed training with 2 executor processes")
    assert started in caplog.text
    run_dir = out / "esmm" / "seed3"
    assert result["runs"][0]["run_dir"] == str(run_dir)
    record = json.loads((run_dir / "metrics.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    assert record["world_size"] == config["world_size"] == 2 and config["job"]["use_gpu"] is False
    assert len(record["history"]) == 2 and record["test"]["ctr_auc"] > 0.6
    assert record["table_versions"] == {"train": 0, "valid": 0, "test": 0}
    assert len(torch.load(run_dir / "checkpoint.pt", weights_only=True)["rng"]) == 2
    assert (out / "results.md").is_file()


def test_train_distributed_rejects_bad_jobs(tmp_path):
    from cvr_spark.train.distributed import train_distributed

    job = {"data_dir": "d", "model": "esmm", "seed": 0, "out_dir": str(tmp_path), "model_options": {},
           "train": {}}
    with pytest.raises(ValueError, match="processes must be >= 1"):
        train_distributed(job, 0, use_gpu=False)
    with pytest.raises(ValueError, match=r"job.model_options.spec' is a FeatureSpec"):
        from cvr_spark.models.base import FeatureSpec

        train_distributed({**job, "model_options": {"spec": FeatureSpec(("a",), (2,))}}, 2, use_gpu=False)
    with pytest.raises(ValueError, match=r"lacks key\(s\) \['seed'\]"):
        train_distributed({k: v for k, v in job.items() if k != "seed"}, 2, use_gpu=False)


def _lazy_rank(rank: int, world_size: int, store: str, out: str, compiled: bool = False) -> None:
    """Two ranks, each half of every batch, lazy embedding Adam through the loop's DDP wrapper
    (and ``torch.compile`` around it, as ``train.compile=true`` does, when ``compiled``)."""
    import torch.distributed as dist

    from cvr_spark.train.loop import compile_net, wrap_ddp

    _init_group(rank, world_size, store)
    try:
        torch.manual_seed(100 + rank)  # different initial weights: DDP and prepare_ddp copy rank 0's
        model, opt = _lazy_model()
        net = wrap_ddp(model, opt, torch.device("cpu"))
        if compiled:
            net = compile_net(net, torch.device("cpu"))
        assert set(model._ddp_params_and_buffers_to_ignore) == {"emb.table.weight", "emb.offsets"}
        for batch, c in _lazy_batches():
            half = slice(rank * 3, rank * 3 + 3)  # rank 0 reads rows the other rank does not
            opt.zero_grad()
            net({"sparse": batch["sparse"][half]}, c[half]).backward()
            opt.step()
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, Path(out) / f"lazy{rank}.pt")
    finally:
        dist.destroy_process_group()


class _EmbHead(torch.nn.Module):
    def __init__(self) -> None:
        from cvr_spark.models.base import EmbeddingArch, FeatureSpec

        super().__init__()
        self.emb = EmbeddingArch(FeatureSpec(("a", "b"), (40, 30)), 3)
        self.head = torch.nn.Linear(6, 1)

    def forward(self, batch, c):
        x = self.emb.flat(batch)  # [B, 6]
        return (self.head(x).squeeze(-1) * c).mean() + (x * x).mean()


def _lazy_model():
    from cvr_spark.train.optim import LazyEmbeddingAdam

    model = _EmbHead()
    return model, LazyEmbeddingAdam(model.head.parameters(), [model.emb], lr=0.05, weight_decay=0.01)


def _lazy_batches():
    g = torch.Generator().manual_seed(7)
    for _ in range(4):
        sparse = torch.stack([torch.randint(0, 40, (6,), generator=g), torch.randint(0, 30, (6,), generator=g)], 1)
        yield {"sparse": sparse}, torch.randn(6, generator=g)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_ddp_lazy_embedding_rows_match_one_process_on_the_whole_batch(tmp_path, compiled):
    """DDP averages the ranks' gradients; the row-wise tables are all-reduced by the optimiser
    over the union of the ranks' rows. Two ranks with half a batch each must end where one
    process with the whole batch ends, with identical tables on both ranks; also with the DDP
    module compiled (train.compile=true: DDP's graph splitting, the row lookups eager)."""
    import torch.multiprocessing as mp

    mp.spawn(_lazy_rank, args=(2, _store(tmp_path), str(tmp_path), compiled), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"lazy{r}.pt", weights_only=True) for r in (0, 1))
    torch.manual_seed(100)  # rank 0's initial weights
    model, opt = _lazy_model()
    for batch, c in _lazy_batches():  # mean over 6 rows == mean of the two ranks' 3-row means
        opt.zero_grad()
        model(batch, c).backward()
        opt.step()
    for key, value in model.state_dict().items():
        assert torch.equal(r0[key], r1[key]), f"{key} differs between ranks"
        torch.testing.assert_close(r0[key], value, rtol=1e-5, atol=1e-6, msg=key)


def _resume_rank(rank: int, world_size: int, data_dir: str, out: str, store: str, kill_after: int) -> None:
    """One rank of a 2-rank run; ``kill_after`` > 0: every rank stops after that many steps."""
    import torch.distributed as dist

    from cvr_spark.train.loop import fit

    try:
        model, train, valid, cfg = _esmm_rank(rank, world_size, data_dir, store)
        if kill_after:
            def stop(batch, out):
                model.steps = getattr(model, "steps", 0) + 1
                if model.steps == kill_after:
                    raise KeyboardInterrupt("simulated kill")
            model.on_train_batch_end = stop
        try:
            result = fit(model, train, valid, cfg, out, rank=rank, world_size=world_size)
        except KeyboardInterrupt:
            return
        if rank == 0:
            history = [(h["train_loss"], h["samples"]) for h in result["history"]]
            Path(out, "history.json").write_text(json.dumps(history))
    finally:
        if dist.is_initialized():  # init may have failed inside _esmm_rank
            dist.destroy_process_group()


def test_ddp_resume_mid_epoch_reports_the_epochs_loss_over_every_rank(tmp_path):
    """Killed after step 5 (checkpoint at step 3, mid-epoch), resumed: the epoch's train loss
    and sample count equal the uninterrupted run's (each rank's partial sums are in the
    checkpoint once, not rank 0's on every rank)."""
    import torch.multiprocessing as mp

    data = str(write_features(tmp_path / "data", n=2000, rows_per_group=70))
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    mp.spawn(_resume_rank, args=(2, data, ref, _store(tmp_path), 0), nprocs=2, join=True)
    mp.spawn(_resume_rank, args=(2, data, run, _store(tmp_path), 5), nprocs=2, join=True)
    assert not Path(run, "history.json").exists()
    mp.spawn(_resume_rank, args=(2, data, run, _store(tmp_path), 0), nprocs=2, join=True)
    expected, resumed = (json.loads(Path(d, "history.json").read_text()) for d in (ref, run))
    assert [s for _, s in resumed] == [s for _, s in expected]
    assert [loss for loss, _ in resumed] == pytest.approx([loss for loss, _ in expected], rel=1e-9)
