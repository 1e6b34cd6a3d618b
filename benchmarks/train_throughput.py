"""Benchmark: samples/s of the training step for the paper presets (ESMM, CSTWA).

    .venv/bin/python benchmarks/train_throughput.py --out benchmarks/results/train_throughput.json

The step is what the training loop does per batch (``cvr_spark.train.loop``): forward, loss,
the NaN guard's host sync, backward, optimiser step, the model's batch hook; set up as the loop
sets it up (:func:`prepare`: ``make_optimizer`` with the preset's ``embedding_optimizer``,
row-wise lazy Adam for the embedding tables by default, ``--embedding-optimizer adam`` for
dense Adam; the CPU malloc setting; ``wrap_ddp`` under DDP). Inputs are preloaded
tensors (batch 2000, 18 single-valued fields with Ali-CCP-like vocabulary sizes after the
min-count filter; ids drawn Zipf-like, ~4% clicks, ~10% of clicks converting), so no I/O is
timed. Settings: CPU with ``--threads`` (2), in float32 and, on a CPU with native bfloat16
(AVX512-BF16 or AMX; ``cvr_spark.train.loop.amp_supported``), with bfloat16 autocast as
``train.amp=true`` trains; CUDA when present (fp32 and bf16 autocast); and DDP with 2 CPU
processes (gloo, 1 thread each; samples/s summed over ranks). ``--compile`` adds each of these
settings again with ``torch.compile`` (``train.compile=true``), timed interleaved with the eager
ones (the compilation happens in the warm-up steps; ``compile_s`` records them). CSTWA gets a synthetic K=8
user/item graph (its Structure Migrator needs one). The float32 and bfloat16 settings of a
device are timed interleaved, ``--rounds`` blocks each in turn, and report the median block
(the JSON keeps every block): on a shared machine a slow spell then hits both alike, so that
their ratio is fair even when the absolute figures move. ``--breakdown`` (CPU) then times
the parts of a step one after the other (forward + loss, backward, optimiser step, of which the
row-wise embedding update) and the matrix products of the model's ``nn.Linear`` calls alone, at
the shapes one forward records: what the step costs beyond its matrix products. Target
(reported, not asserted): >= 250k samples/s for ESMM on 2 CPU cores. The JSON also records the git commit,
the command line, the UTC time and the machine (``_provenance.py``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any, Sequence

import torch

import _provenance

# Ali-CCP AITM-18 fields with approximate vocabulary sizes after the feature job's filter.
VOCAB = {"101": 200_000, "121": 98, "122": 14, "124": 3, "125": 8, "126": 4, "127": 4, "128": 3,
         "129": 5, "205": 300_000, "206": 6_000, "207": 200_000, "216": 50_000, "508": 9_000,
         "509": 200_000, "702": 100_000, "853": 50_000, "301": 4}
TARGET_ESMM_CPU = 250_000


def make_spec() -> Any:
    from cvr_spark.data.fields import group_of
    from cvr_spark.models.base import FeatureSpec

    return FeatureSpec(sparse_fields=tuple(VOCAB), sparse_vocab=tuple(VOCAB.values()),
                       groups={f: group_of(f) for f in VOCAB})


def make_batches(spec: Any, n_batches: int, batch_size: int, device: str, seed: int = 0) -> list[dict]:
    """Preloaded batches: Zipf-like ids per field, ~4% clicks, ~10% of clicks converting."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        cols = []
        for v in spec.sparse_vocab:
            u = torch.rand(batch_size, generator=g)
            cols.append((v * u.pow(3)).long().clamp_max(v - 1))  # skewed towards small ids
        click = (torch.rand(batch_size, generator=g) < 0.04).float()
        conv = click * (torch.rand(batch_size, generator=g) < 0.1).float()
        batch = {"sparse": torch.stack(cols, 1), "click": click, "conversion": conv}  # sparse: [B, F]
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


def synthetic_graphs(model: Any, k: int = 8, seed: int = 0) -> None:
    """Random K-neighbour user and item graphs over the key fields' vocabularies (CSTWA only)."""
    from cvr_spark.models.cstwa_graph import StructureGraph, graph_fields, normalize_adjacency

    g = torch.Generator().manual_seed(seed)
    graphs = []
    for group, key in (("user", model.spec.user_key_field), ("item", model.spec.item_key_field)):
        n = model.spec.sparse_vocab[model.spec.sparse_fields.index(key)]
        rows = torch.arange(n).repeat_interleave(k)
        cols = torch.randint(0, n, (n * k,), generator=g)
        adj = normalize_adjacency(torch.stack([rows, cols]), torch.rand(n * k, generator=g), n)
        fields = graph_fields(model.spec, group)
        node_fields = torch.stack([torch.arange(n) if f == key else torch.randint(
            0, model.spec.sparse_vocab[model.spec.sparse_fields.index(f)], (n,), generator=g) for f in fields], 1)
        graphs.append(StructureGraph(adj, node_fields))
    model.set_graphs(*graphs)


def build_model(name: str, device: str) -> Any:
    from cvr_spark.models import registry

    torch.manual_seed(0)
    model = registry.build(name, make_spec(), registry.preset_options(name, "paper")).to(device)
    if callable(getattr(model, "set_graphs", None)) and getattr(model.cfg, "structure_migrator", False):
        synthetic_graphs(model)
    return model


def train_steps(net: torch.nn.Module, model: Any, opt: torch.optim.Optimizer, batches: list[dict],
                steps: int, amp: bool = False, phases: dict | None = None) -> None:
    """``steps`` training steps over ``batches`` (cycled), as the loop runs them. ``phases``: add
    each part's seconds to it (``forward_loss``, ``backward``, ``optimizer``, ``hook``; on CPU,
    where ops are synchronous)."""
    from cvr_spark.train.loop import float32_outputs

    device_type = batches[0]["click"].device.type
    clock = time.perf_counter
    for i in range(steps):
        batch = batches[i % len(batches)]
        t0 = clock()
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
            out = net(batch)
        if amp:
            out = float32_outputs(out)
        terms = model.loss(batch, out)
        if not torch.isfinite(terms["total"]).item():  # the loop's NaN guard syncs once per step
            raise FloatingPointError(f"non-finite loss at step {i}")
        t1 = clock()
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        t2 = clock()
        opt.step()
        t3 = clock()
        model.on_train_batch_end(batch, out)
        if phases is not None:
            for key, dt in (("forward_loss", t1 - t0), ("backward", t2 - t1), ("optimizer", t3 - t2),
                            ("hook", clock() - t3)):
                phases[key] = phases.get(key, 0.0) + dt


def prepare(model: Any, device: str, embedding_optimizer: str | None, ddp: bool = False,
            compiled: bool = False) -> tuple:
    """What the training loop does before its first step (``cvr_spark.train.loop._Trainer``):
    the CPU allocator setting, the optimiser, the DDP wrapper (row-wise embedding tables
    kept out of DDP's all-reduce) and, with ``compiled`` (``train.compile=true``),
    ``torch.compile`` around it. Returns (net, optimiser)."""
    from cvr_spark.train.cpu import tune_malloc
    from cvr_spark.train.loop import TrainConfig, compile_net, make_optimizer, wrap_ddp

    cfg = TrainConfig()
    if device == "cpu" and cfg.tune_malloc:
        tune_malloc()
    opt = make_optimizer(model, embedding_optimizer)  # the loop's optimiser
    net = wrap_ddp(model, opt, torch.device(device), cfg.find_unused_parameters) if ddp else model
    if compiled:
        net = compile_net(net, torch.device(device), cfg.compile_mode)
    return net, opt


def measure(net: torch.nn.Module, model: Any, opt: torch.optim.Optimizer, batches: list[dict], warmup: int,
            steps: int, amp: bool = False) -> float:
    """Samples/s of ``steps`` timed steps after ``warmup`` untimed ones."""
    net.train()
    train_steps(net, model, opt, batches, warmup, amp)
    sync = torch.cuda.synchronize if batches[0]["click"].is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    train_steps(net, model, opt, batches, steps, amp)
    sync()
    return steps * batches[0]["click"].shape[0] / (time.perf_counter() - t0)


def linear_shapes(net: torch.nn.Module, batch: dict, amp: bool = False) -> list[tuple[int, int, int]]:
    """(rows, in, out) of every ``nn.Linear`` call in one training forward of ``batch`` (pass
    the model itself, not a compiled wrapper: the hooks need the eager forward)."""
    shapes: list[tuple[int, int, int]] = []

    def hook(module: torch.nn.Linear, inputs: tuple, _output: Any) -> None:
        shapes.append((inputs[0].numel() // module.in_features, module.in_features, module.out_features))

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.autocast(batch["click"].device.type, dtype=torch.bfloat16, enabled=amp):
            net(batch)
    finally:
        for h in handles:
            h.remove()
    return shapes


def gemm_ms(shapes: list[tuple[int, int, int]], dtype: torch.dtype, reps: int = 20) -> float:
    """Milliseconds of the matrix products of those Linear calls alone, per step: for each, the
    forward product and backward's two (input and weight gradients), on random operands."""
    ops = []
    for rows, k, n in shapes:
        x, w, gy = torch.randn(rows, k, dtype=dtype), torch.randn(n, k, dtype=dtype), torch.randn(rows, n, dtype=dtype)
        ops.append((x, w, gy))

    def once() -> None:
        for x, w, gy in ops:
            torch.mm(x, w.t()), torch.mm(gy, w), torch.mm(gy.t(), x)

    once()
    t0 = time.perf_counter()
    for _ in range(reps):
        once()
    return (time.perf_counter() - t0) / reps * 1e3


def phase_ms(net: torch.nn.Module, model: Any, opt: torch.optim.Optimizer, batches: list[dict], steps: int,
             amp: bool = False) -> dict:
    """Milliseconds per step of each part of :func:`train_steps`' step (CPU: ops are synchronous),
    with the row-wise embedding update (``LazyEmbeddingAdam._table_step``) apart from the rest
    of the optimiser step, and the ``nn.Linear`` matrix products alone (:func:`gemm_ms`)."""
    total = dict.fromkeys(("forward_loss", "backward", "optimizer", "embedding_rows", "hook"), 0.0)
    table_step = getattr(opt, "_table_step", None)
    if table_step is not None:  # time the row-wise part inside opt.step()
        def timed(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return table_step(*a, **k)
            finally:
                total["embedding_rows"] += time.perf_counter() - t
        opt._table_step = timed
    try:
        train_steps(net, model, opt, batches, steps, amp, total)
    finally:
        if table_step is not None:
            del opt._table_step
    ms = {k: v / steps * 1e3 for k, v in total.items()}
    ms["step"] = ms["forward_loss"] + ms["backward"] + ms["optimizer"] + ms["hook"]
    ms["gemm_alone"] = gemm_ms(linear_shapes(model, batches[0], amp), torch.bfloat16 if amp else torch.float32)
    return ms


def embedding_optimizer(model: Any, args: argparse.Namespace) -> str:
    return args.embedding_optimizer or model.cfg.embedding_optimizer


def setting_name(device: str, amp: bool, compiled: bool) -> str:
    return f"{device}{'-bf16' if amp else ''}{'-compile' if compiled else ''}"


def bench_single(name: str, device: str, threads: int, args: argparse.Namespace,
                 amps: Sequence[bool] = (False,), compiles: Sequence[bool] = (False,)) -> list[dict]:
    """One row per setting, a pair (amp, compiled) of ``amps`` x ``compiles``. Several settings
    are timed interleaved: each one's ``args.steps`` timed steps run as ``args.rounds`` blocks in
    turn with the others' blocks, so that a slow spell of a shared machine hits every setting
    alike; ``samples_per_s`` is the median block, ``rounds`` every block. A compiled setting
    compiles during its warm-up steps (``compile_s``: their seconds)."""
    torch.set_num_threads(threads)
    runs = []
    for amp in amps:
        for compiled in compiles:
            model = build_model(name, device)
            batches = make_batches(model.spec, 8, args.batch_size, device)
            net, opt = prepare(model, device, args.embedding_optimizer, compiled=compiled)
            net.train()
            t0 = time.perf_counter()
            train_steps(net, model, opt, batches, args.warmup, amp)  # warm-up, untimed
            runs.append(((amp, compiled), net, model, opt, batches, time.perf_counter() - t0))
    block = max(1, args.steps // args.rounds)
    rates: dict[tuple, list[float]] = {key: [] for key, *_ in runs}
    for _ in range(args.rounds):
        for (amp, compiled), net, model, opt, batches, _ in runs:
            rates[amp, compiled].append(measure(net, model, opt, batches, 0, block, amp))
    rows = []
    for (amp, compiled), _, model, _, _, warm_s in runs:
        row = {"model": name, "setting": setting_name(device, amp, compiled), "threads": threads, "processes": 1,
               "embedding_optimizer": embedding_optimizer(model, args), "compiled": compiled,
               "samples_per_s": statistics.median(rates[amp, compiled]), "rounds": rates[amp, compiled]}
        if compiled:
            row["compile_s"] = warm_s
        rows.append(row)
    if args.breakdown and device == "cpu":
        for row, ((amp, _), net, model, opt, batches, _) in zip(rows, runs):
            row["breakdown_ms"] = phase_ms(net, model, opt, batches, block, amp)
    return rows


def _ddp_rank(rank: int, world: int, name: str, store: str, args: argparse.Namespace, queue: Any,
              compiled: bool = False) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    try:
        model = build_model(name, "cpu")
        net, opt = prepare(model, "cpu", args.embedding_optimizer, ddp=True, compiled=compiled)
        batches = make_batches(model.spec, 8, args.batch_size, "cpu", seed=rank)
        rate = measure(net, model, opt, batches, args.warmup, args.steps)
        queue.put((rank, rate, embedding_optimizer(model, args)))
    finally:
        dist.destroy_process_group()


def bench_ddp(name: str, args: argparse.Namespace, world: int = 2, compiled: bool = False) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:  # a rendezvous file: no free-port race
        mp.start_processes(_ddp_rank, args=(world, name, f"file://{tmp}/rendezvous", args, queue, compiled),
                           nprocs=world,
                           join=True, start_method="spawn")
    got = [queue.get() for _ in range(world)]
    rates = {rank: rate for rank, rate, _ in got}
    return {"model": name, "setting": setting_name("ddp-gloo-cpu", False, compiled), "threads": 1,
            "processes": world, "embedding_optimizer": got[0][2], "compiled": compiled,
            "samples_per_s": sum(rates.values()),
            "per_rank": [rates[r] for r in range(world)]}


def main() -> None:
    from cvr_spark.models import registry
    from cvr_spark.train.loop import amp_supported

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="esmm,cstwa", help="comma list; unregistered names are skipped")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=50, help="timed steps per setting")
    p.add_argument("--rounds", type=int, default=5,
                   help="blocks the timed steps of interleaved settings (CPU float32/bfloat16, CUDA) run in")
    p.add_argument("--settings", default="cpu,cuda,ddp", help="subset of cpu, cuda, ddp")
    p.add_argument("--embedding-optimizer", default=None, choices=("lazy_adam", "adam"),
                   help="override the presets' model.embedding_optimizer (default: the preset's)")
    p.add_argument("--breakdown", action="store_true",
                   help="CPU: also time the parts of a step (forward + loss, backward, optimiser, of which the "
                        "row-wise embedding update) and the towers' matrix products alone")
    p.add_argument("--compile", action="store_true",
                   help="also time every setting with torch.compile (train.compile=true), interleaved with the eager ones")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    provenance = _provenance.run_info()
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    models = [m for m in wanted if m in registry.names()]
    skipped = sorted(set(wanted) - set(models))
    settings = set(args.settings.split(","))
    compiles = (False, True) if args.compile else (False,)
    rows = []
    for name in models:
        if "cpu" in settings:  # with train.amp=true's bfloat16 autocast where this CPU has it
            amps = (False, True) if amp_supported(torch.device("cpu"), "bfloat16") else (False,)
            rows += bench_single(name, "cpu", args.threads, args, amps, compiles)
        if "cuda" in settings and torch.cuda.is_available():
            rows += bench_single(name, "cuda", args.threads, args, (False, True), compiles)
        if "ddp" in settings:
            rows += [bench_ddp(name, args, compiled=c) for c in compiles]
        for r in rows:
            if r["model"] == name:
                print(f"{name:<8} {r['setting']:<22} threads={r['threads']} processes={r['processes']} "
                      f"embeddings={r['embedding_optimizer']}: "
                      f"{r['samples_per_s']:>12,.0f} samples/s", flush=True)
                if "breakdown_ms" in r:
                    b = r["breakdown_ms"]
                    print(f"{'':<9}ms per step: forward+loss {b['forward_loss']:.2f}, backward {b['backward']:.2f}, "
                          f"optimizer {b['optimizer']:.2f} (embedding rows {b['embedding_rows']:.2f}), "
                          f"hook {b['hook']:.2f} = {b['step']:.2f}; Linear matrix products alone "
                          f"{b['gemm_alone']:.2f}", flush=True)
    for setting, how in (("cpu", "float32"), ("cpu-bf16", "bfloat16 autocast, train.amp=true"),
                         ("cpu-compile", "float32, train.compile=true"),
                         ("cpu-bf16-compile", "bfloat16 autocast and torch.compile, train.amp=true train.compile=true")):
        rate = next((r["samples_per_s"] for r in rows if r["model"] == "esmm" and r["setting"] == setting), None)
        if rate is not None:
            print(f"ESMM on {args.threads} CPU threads, {how}: {rate:,.0f} samples/s "
                  f"(target {TARGET_ESMM_CPU:,}: {'met' if rate >= TARGET_ESMM_CPU else 'NOT met'})")
    if skipped:
        print(f"skipped (not registered): {', '.join(skipped)}")
    result = {"rows": rows, "skipped": skipped, "batch_size": args.batch_size, "steps": args.steps,
              "rounds": args.rounds,
              "warmup": args.warmup, "vocab": VOCAB, "torch": torch.__version__,
              "provenance": provenance, "machine": _provenance.machine_info(("torch", "numpy")),
              "cpu_count": os.cpu_count(), "load_avg": os.getloadavg(),
              "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    if args.out:
        _provenance.write_result(args.out, result)


if __name__ == "__main__":
    main()
