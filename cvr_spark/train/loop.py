"""One training loop for every model: epochs, validation, early stopping, checkpoints, resume.

``fit`` runs the same code in one process and under DDP (one call per rank; the process group
is set up by the caller, see :mod:`cvr_spark.train.distributed`):

* **Validation** after every epoch over the whole validation split: each rank predicts its
  shard, rank 0 gathers every prediction, computes the metrics exactly
  (:func:`cvr_spark.evaluate.metrics.compute_metrics`, global AUC, never batch-averaged) and
  broadcasts them, so every rank takes the same early-stopping decision.
* **Early stopping** on a validation metric only (the test split is never seen here); the
  best epoch's weights are kept and loaded into the model when ``fit`` returns.
* **Checkpoints** (rank 0 writes; every rank's RNG state is gathered into it) at every epoch
  end and every ``checkpoint_every`` steps; ``resume`` continues from the last one, mid-epoch
  included (the loaders' permutations depend on (seed, epoch, rank) only, so the batches
  already done are skipped, and the run ends with the same weights as an uninterrupted one).
* **NaN/inf guard**: a non-finite loss stops training with an error naming the epoch, the step
  and every loss term. Under DDP the failing rank raises and torchrun stops the others.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import numpy as np
import torch
from torch import Tensor, nn

from cvr_spark.models.base import CVRModel
from cvr_spark.train import checkpoint as ckpt
from cvr_spark.train.cpu import tune_malloc
from cvr_spark.train.optim import make_optimizer, prepare_ddp

log = logging.getLogger(__name__)

OUTPUT_KEYS = ("p_ctr", "p_cvr", "p_ctcvr")
# Validation metrics early stopping can use: scalar, observable (no simulator truth), and best
# at an extreme (not PCOC, best at 1). See cvr_spark.evaluate.metrics.METRIC_SPACES.
STOPPING_METRICS = ("ctr_auc", "cvr_auc_clicked", "cvr_auc_all", "ctcvr_auc", "gauc_ctr",
                    "logloss_ctr", "logloss_cvr_clicked", "logloss_ctcvr")
LOADERS = ("arrow", "petastorm")
# Train options a resumed run may change: they do not change what a step computes.
RESUMABLE_CHANGES = frozenset({"epochs", "patience", "max_steps", "log_every", "checkpoint_every", "resume",
                               "num_threads", "eval_batch_size", "in_memory", "progress", "mlflow",
                               "find_unused_parameters", "tune_malloc", "device", "metric_names", "loader"})
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
PASSTHROUGH_KEYS = ("click", "conversion", "user_key", "item_key", "sample_id")


@dataclass
class TrainConfig:
    """How ``fit`` trains (model hyperparameters such as lr and batch size live in ModelConfig).

    ``early_stop_metric`` is a comma-separated list of validation metric names whose mean is
    the stopping score; the default is the AITM/CSTWA rule (click AUC + the model's CTCVR /
    purchase AUC). ``early_stop_mode``: ``max``, ``min`` or ``auto`` (``min`` when every name
    is a logloss or an MAE). ``patience`` 0 disables early stopping. ``checkpoint_every`` /
    ``max_steps`` / ``num_threads`` 0 mean off / unlimited / torch's default.
    """

    epochs: int = 10
    patience: int = 1
    early_stop_metric: str = "ctr_auc,ctcvr_auc"
    early_stop_mode: str = "auto"
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    amp_dtype: str = "bfloat16"
    # torch.compile the training forward (TorchInductor; the row-wise embedding lookups stay
    # eager, a graph break). Off by default: each model compiles for seconds (up to about 20 s on
    # 2 CPU cores) before its first step, the dropout masks then come from Inductor's generator
    # (seeded by torch's, so runs stay reproducible), and on CPU it needs a C++ compiler.
    # compile_mode: torch.compile's mode. "reduce-overhead" and "max-autotune" add CUDA graphs on a
    # GPU, which were never tried (no GPU was available to this project); on 2 CPU cores
    # "max-autotune-no-cudagraphs" timed like "default" for ESMM's step.
    compile: bool = False
    compile_mode: str = "default"
    log_every: int = 100
    checkpoint_every: int = 0
    resume: bool = True
    num_threads: int = 0
    max_steps: int = 0
    eval_batch_size: int = 8192
    in_memory: bool = True
    # Reader of the train / valid splits: "arrow" (FeatureLoader, pyarrow) or "petastorm" (the
    # optional extra, same interface; needs pyarrow<15 and numpy<2, so pyspark<=4.0).
    loader: str = "arrow"
    progress: bool = True
    # DDP's find_unused_parameters. Off: every registered model puts every trainable parameter in
    # the graph of every training step, also in a batch without clicks (tests/test_registry.py),
    # so DDP needs no extra pass over the autograd graph per step. A custom model that leaves a
    # parameter out of a step must set it true (DDP then fails at the next step saying so).
    find_unused_parameters: bool = False
    # CPU training: raise glibc malloc's mmap/trim thresholds so that activation-sized tensors
    # reuse heap memory instead of page-faulting fresh mmap'd pages (cvr_spark.train.cpu).
    tune_malloc: bool = True
    # Log every run of an experiment to MLflow (the driver, after training) when mlflow is
    # importable; false: never (cvr_spark.train.experiment).
    mlflow: bool = True
    metric_names: list[str] = field(default_factory=list)  # filled from early_stop_metric

    def __post_init__(self) -> None:
        for name in ("epochs", "log_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("patience", "checkpoint_every", "max_steps", "num_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"train.device must be auto, cpu or cuda[:i], got {self.device!r}")
        if self.loader not in LOADERS:
            raise ValueError(f"train.loader must be one of {LOADERS}, got {self.loader!r}")
        if self.amp_dtype not in ("bfloat16", "float16"):
            raise ValueError(f"train.amp_dtype must be bfloat16 or float16, got {self.amp_dtype!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"train.compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        self.metric_names = [m.strip() for m in self.early_stop_metric.split(",") if m.strip()]
        if not self.metric_names:
            raise ValueError("train.early_stop_metric names no metric")
        unknown = [m for m in self.metric_names if m not in STOPPING_METRICS]
        if unknown:
            raise ValueError(f"train.early_stop_metric: {unknown} cannot stop training (validation metrics "
                             f"that can: {', '.join(STOPPING_METRICS)}; PCOC is best at 1, not at an "
                             "extreme, and the simulator's truth is not a validation signal)")
        if self.early_stop_mode == "auto":
            lower_is_better = all("logloss" in m or m.endswith("mae") for m in self.metric_names)
            self.early_stop_mode = "min" if lower_is_better else "max"
        if self.early_stop_mode not in ("max", "min"):
            raise ValueError(f"train.early_stop_mode must be max, min or auto, got {self.early_stop_mode!r}")


def wrap_ddp(module: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
             find_unused_parameters: bool = False) -> nn.Module:
    """``module`` in DistributedDataParallel, with ``optimizer``'s row-wise embedding tables kept
    out of DDP's dense all-reduce (the optimiser all-reduces their looked-up rows; see
    :func:`cvr_spark.train.optim.prepare_ddp`). The process group must be initialised."""
    from torch.nn.parallel import DistributedDataParallel

    prepare_ddp(module, optimizer)
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused_parameters)


def compile_net(net: nn.Module, device: torch.device, mode: str = "default") -> nn.Module:
    """``torch.compile(net, mode=mode)`` for training (``train.compile=true``), after DDP wrapping
    where there is one (DDP's graph splitting at its buckets then applies). On CPU, Inductor
    builds its kernels with a C++ compiler: a missing one is reported here, before any
    training, instead of as a compiler crash at the first step."""
    if device.type == "cpu" and not (os.environ.get("CXX") or any(
            shutil.which(c) for c in ("g++", "c++", "clang++"))):
        raise RuntimeError("train.compile=true on CPU needs a C++ compiler for TorchInductor's kernels "
                           "(g++, c++ or clang++ on PATH, or CXX set); install one or set train.compile=false")
    return torch.compile(net, mode=mode)


def float32_outputs(out: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Model outputs with the floating ones in float32: what the losses read after an autocast
    forward (BCE on low-precision probabilities is unsafe under autocast)."""
    return {k: v.float() if torch.is_floating_point(v) else v for k, v in out.items()}


def amp_supported(device: torch.device, dtype: str) -> bool:
    """Whether ``train.amp`` autocasts on ``device``: CUDA (bfloat16 or float16), or bfloat16 on a
    CPU with native bfloat16 arithmetic (AVX512-BF16 or AMX, where oneDNN's bfloat16 matrix
    products ran about twice as fast as float32 ones on the README's machine). Other CPUs have no
    native bfloat16 kernels to gain from, so autocast stays off there (with a warning)."""
    if device.type == "cuda":
        return True
    if device.type != "cpu" or dtype != "bfloat16":
        return False
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name} but CUDA is not available")
    return torch.device(name)


def to_device(batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Move every tensor of ``batch`` to ``device`` (a no-op for tensors already there)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _unwrap(model: nn.Module) -> CVRModel:
    return model.module if hasattr(model, "module") else model  # DDP keeps the model in .module


@torch.inference_mode()
def predict(model: nn.Module, loader: Iterable[Mapping[str, Tensor]],
            device: Optional[torch.device] = None) -> dict[str, np.ndarray]:
    """Predictions over every batch of ``loader`` as numpy arrays.

    Returns ``p_ctr``, ``p_cvr``, ``p_ctcvr`` (and the model's ``cvr_output`` / ``ctcvr_output``
    when named otherwise) as float64, plus the batch's ``click``, ``conversion``, ``user_key``,
    ``item_key`` and ``sample_id`` where present. The model is left in eval mode.
    """
    net = _unwrap(model)
    device = device or next(net.parameters()).device
    wanted = list(dict.fromkeys([*OUTPUT_KEYS, net.cvr_output, net.ctcvr_output]))
    parts: dict[str, list[np.ndarray]] = {}
    net.eval()
    for batch in loader:
        batch = to_device(batch, device)
        out = net(batch)
        for key in wanted:
            if key not in out:
                raise KeyError(f"{type(net).__name__}.forward returned no '{key}' (has: {sorted(out)})")
            parts.setdefault(key, []).append(out[key].float().cpu().numpy().astype(np.float64))
        for key in PASSTHROUGH_KEYS:
            if key in batch:
                parts.setdefault(key, []).append(batch[key].cpu().numpy())
    if not parts:
        raise ValueError("predict: the loader yielded no batches")
    return {k: np.concatenate(v) for k, v in parts.items()}


def _defined(value: Any) -> bool:
    return value is not None and math.isfinite(float(value))


def validation_score(metrics: Mapping[str, Any], cfg: TrainConfig) -> float:
    """Mean of the early-stopping metrics that are defined on the validation split.

    A metric can be undefined (NaN) whatever the model predicts: an AUC whose sample space has one
    class only (e.g. ``ctcvr_auc`` on a small validation split without a conversion). Such a term
    depends on the labels only, so it is undefined in every epoch: it is left out of the mean
    (with a warning) and the epochs stay comparable. Left in, it would make every score NaN and
    pin the best epoch to the first one.

    Raises:
        KeyError: a metric name is not in ``metrics`` (the message lists the available names).
        ValueError: none of the metrics is defined on the validation split.
    """
    for name in cfg.metric_names:
        if name not in metrics:
            raise KeyError(f"train.early_stop_metric: no validation metric '{name}' "
                           f"(available: {sorted(metrics)})")
    values = [float(metrics[n]) for n in cfg.metric_names if _defined(metrics[n])]
    undefined = [n for n in cfg.metric_names if not _defined(metrics[n])]
    notes = "; ".join(n for n in metrics.get("notes") or [] if n.split(":")[0] in undefined)
    if not values:
        raise ValueError(f"train.early_stop_metric={cfg.early_stop_metric}: undefined on the validation split "
                         f"({notes or 'NaN'}); stop on a metric the split supports, e.g. "
                         "train.early_stop_metric=ctr_auc or logloss_ctr")
    if undefined:
        log.warning("early stopping leaves out %s, undefined on the validation split (%s)", undefined, notes or "NaN")
    return float(np.mean(values))


def _improved(score: float, best: Optional[float], mode: str) -> bool:
    if best is None:
        return True
    if not math.isfinite(score):
        return False
    if not math.isfinite(best):
        return True
    return score > best if mode == "max" else score < best


@dataclass
class LoopState:
    """Where training stands; everything here goes into the checkpoint as plain values."""

    epoch: int = 0  # epoch in progress (or next to start)
    batch: int = 0  # batches done inside ``epoch``
    step: int = 0  # optimiser steps done in total
    loss_sum: float = 0.0  # sum of batch-size-weighted total loss inside ``epoch``
    samples: int = 0  # samples seen inside ``epoch``
    best_score: Optional[float] = None
    best_epoch: int = -1
    bad_epochs: int = 0
    done: bool = False
    stopped_early: bool = False
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LoopState":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def fit(model: CVRModel, train_loader: Any, valid_loader: Any, cfg: TrainConfig, out_dir: str | Path,
        *, rank: int = 0, world_size: int = 1, meta: Optional[Mapping[str, Any]] = None,
        record: Optional[Mapping[str, Any]] = None) -> dict:
    """Train ``model`` with early stopping on ``valid_loader``; returns the run summary.

    Args:
        model: a registered model (not yet wrapped; ``fit`` wraps it in DDP when world_size > 1).
        train_loader / valid_loader: iterables of batch dicts with ``set_epoch`` and ``__len__``
            (each rank's shard under DDP; every rank must yield the same number of batches).
        cfg: loop settings. out_dir: where ``checkpoint.pt`` lives (rank 0 writes it).
        rank / world_size: this process under DDP (the process group must be initialised).
        meta: plain values stored in the checkpoint (model name, options, spec, job).
        record: written by rank 0 to ``out_dir/config.json`` once a checkpoint found there is
            known to belong to this run (so a refused resume leaves the old record in place).

    Returns:
        ``best_epoch``, ``best_score``, ``valid`` (best epoch's metrics), ``history``,
        ``epochs_run``, ``steps``, ``stopped_early``, ``checkpoint``, ``table_versions``.
        The model holds the best weights on return.

    Raises:
        FloatingPointError: a non-finite loss (names epoch, step and loss terms).
        ValueError: ``out_dir`` holds a checkpoint of another run (other model options, train
            options, data or table versions) and ``cfg.resume`` is true.
    """
    trainer = _Trainer(model, train_loader, valid_loader, cfg, Path(out_dir), rank, world_size, meta)
    if record is not None and rank == 0:
        write_json(Path(out_dir) / "config.json", record)
    return trainer.run()


def write_json(path: Path, obj: Any) -> None:
    """``obj`` (made plain: numpy values as Python ones) as JSON at ``path``, written atomically."""
    from cvr_spark.tables import write_json_atomic

    write_json_atomic(path, plain(obj))


def run_identity(config: Mapping[str, Any], meta: Mapping[str, Any], table_versions: Mapping[str, Any]) -> dict:
    """What a checkpoint must share with a run to be resumed by it: the model and its options,
    the feature spec, the data folder and graph version, the train options other than
    :data:`RESUMABLE_CHANGES`, and the feature table versions (flat dotted keys)."""
    job = meta.get("job") or {}
    out = {f"train.{k}": v for k, v in config.items() if k not in RESUMABLE_CHANGES}
    out.update({f"model.{k}": v for k, v in (meta.get("model_options") or {}).items()})
    out.update({f"table_version.{k}": v for k, v in table_versions.items()})
    for key in ("data_dir", "graph_dir", "graph_version"):
        if key in job:
            out[key] = job[key]
    if "model_name" in meta:
        out["model"] = meta["model_name"]
    if "spec" in meta:
        out["spec"] = meta["spec"]
    return plain(out)


def plain(obj: Any) -> Any:
    """``obj`` with numpy scalars / arrays turned into Python numbers / lists (JSON- and
    ``weights_only``-safe); dicts, lists and tuples are converted recursively."""
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


class _Trainer:
    """The stateful half of :func:`fit` (one instance per call)."""

    def __init__(self, model: CVRModel, train_loader: Any, valid_loader: Any, cfg: TrainConfig,
                 out_dir: Path, rank: int, world_size: int, meta: Optional[Mapping[str, Any]]) -> None:
        self.module, self.train_loader, self.valid_loader = model, train_loader, valid_loader
        self.cfg, self.rank, self.world_size, self.meta = cfg, rank, world_size, plain(dict(meta or {}))
        self.path = out_dir / ckpt.CHECKPOINT_NAME
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", rank)))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        elif cfg.tune_malloc:
            tune_malloc()
        self.amp = cfg.amp and amp_supported(self.device, cfg.amp_dtype)
        if cfg.amp and not self.amp:
            log.warning("train.amp=true ignored: %s autocast needs a CUDA device%s", cfg.amp_dtype,
                        " or a CPU with native bfloat16 (AVX512-BF16 or AMX)" if cfg.amp_dtype == "bfloat16" else "")
        self.amp_dtype = getattr(torch, cfg.amp_dtype)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp and cfg.amp_dtype == "float16" else None
        ckpt.seed_everything(cfg.seed + rank)  # dropout differs per rank; weights come from rank 0
        model.to(self.device)
        choice = None
        if self.scaler is not None and getattr(model.cfg, "embedding_optimizer", "adam") != "adam":
            log.warning("model.embedding_optimizer=%s: float16 AMP's gradient scaler unscales dense "
                        "gradients only, so the embedding tables use dense Adam in this run",
                        model.cfg.embedding_optimizer)
            choice = "adam"
        self.optimizer = make_optimizer(model, choice)
        self.state, self.best_weights = LoopState(), None
        self.table_versions = {name: getattr(ld, "table_version", None)
                               for name, ld in (("train", train_loader), ("valid", valid_loader))}
        if cfg.resume and self.path.is_file():
            self._resume()
        self.net = self._wrap()

    def _wrap(self) -> nn.Module:
        net = self.module
        if self.world_size > 1:
            net = wrap_ddp(net, self.optimizer, self.device, self.cfg.find_unused_parameters)
        if self.cfg.compile:  # training forward only: validation and scoring run self.module eagerly
            # Each run starts from empty compile caches: the models of an experiment train one
            # after the other in one process and share functions (EmbeddingArch.lookup, MLP's
            # forward) whose cached graphs would otherwise pile up per model, shape and autocast
            # state until dynamo's recompile limit sends them back to eager. (Inductor's on-disk
            # cache still makes a repeated compilation fast.)
            torch.compiler.reset()
            net = compile_net(net, self.device, self.cfg.compile_mode)
        return net

    def _check_same_run(self, state: Mapping[str, Any]) -> None:
        """Raises ValueError when the checkpoint was written by another run (see :func:`run_identity`)."""
        saved = run_identity(state.get("config") or {}, state.get("meta") or {}, state.get("table_versions") or {})
        now = run_identity(dataclasses.asdict(self.cfg), self.meta, self.table_versions)
        diffs = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in sorted(set(saved) & set(now))
                 if saved[k] != now[k] and k != "spec"]
        if saved.get("spec") is not None and now.get("spec") is not None and saved["spec"] != now["spec"]:
            diffs.append("the feature spec (fields or vocabulary sizes)")
        if diffs:
            raise ValueError(f"{self.path} was written by another run ({'; '.join(diffs)}): train into a new "
                             "output folder, or set train.resume=false to start this run over (its "
                             "checkpoint is then replaced)")

    def _resume(self) -> None:
        state = ckpt.load_checkpoint(self.path, map_location="cpu")
        self._check_same_run(state)
        loop = LoopState.from_dict(state["loop"])
        saved_ws = int(state.get("world_size", 1))
        if loop.batch and saved_ws != self.world_size:
            raise ValueError(f"{self.path}: saved mid-epoch with world_size={saved_ws}; resuming with "
                             f"{self.world_size} ranks would change the shards (resume with {saved_ws})")
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.rank != 0:  # the checkpoint holds the epoch's partial sums over every rank
            loop.loss_sum, loop.samples = 0.0, 0
        self.state, self.best_weights = loop, state.get("best_model")
        rngs = state.get("rng") or []
        if self.rank < len(rngs):
            ckpt.restore_rng(rngs[self.rank])
        cfg = self.cfg
        loop.done = loop.stopped_early or loop.epoch >= cfg.epochs or bool(cfg.max_steps and loop.step >= cfg.max_steps)
        log.info("resumed from %s at epoch %d, batch %d, step %d", self.path, loop.epoch, loop.batch, loop.step)

    def run(self) -> dict:
        st = self.state
        while not st.done:
            elapsed = self._train_epoch()
            self._end_epoch(elapsed)
        if self.best_weights is not None:
            self.module.load_state_dict(self.best_weights)
        return self._summary()

    def _max_steps_reached(self) -> bool:
        return bool(self.cfg.max_steps and self.state.step >= self.cfg.max_steps)

    def _train_epoch(self) -> float:
        """Train the rest of the current epoch; returns the seconds spent in training steps."""
        from tqdm.auto import tqdm

        st, cfg = self.state, self.cfg
        self.train_loader.set_epoch(st.epoch)
        self.net.train()
        bar = tqdm(total=len(self.train_loader), initial=st.batch, desc=f"epoch {st.epoch}", unit="batch",
                   disable=self.rank != 0 or not cfg.progress, leave=False)
        skip, elapsed, t0 = st.batch, 0.0, time.perf_counter()
        for i, batch in enumerate(self.train_loader):
            if i < skip:  # resumed mid-epoch: these batches were trained before the checkpoint
                continue
            self._step(batch)
            bar.update(1)
            if st.step % cfg.log_every == 0:
                rate = st.samples * self.world_size / max(elapsed + time.perf_counter() - t0, 1e-9)
                bar.set_postfix(loss=f"{st.loss_sum / max(st.samples, 1):.5f}", samples_s=f"{rate:,.0f}")
                log.info("epoch %d step %d loss %.5f %.0f samples/s", st.epoch, st.step,
                         st.loss_sum / max(st.samples, 1), rate)
            if cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0:
                elapsed += time.perf_counter() - t0
                self._checkpoint()
                t0 = time.perf_counter()
            if self._max_steps_reached():
                break
        bar.close()
        return elapsed + time.perf_counter() - t0

    def _step(self, batch: Mapping[str, Tensor]) -> None:
        st = self.state
        batch = to_device(batch, self.device)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            out = self.net(batch)
        if self.amp:  # losses run in float32
            out = float32_outputs(out)
        where = f"epoch {st.epoch}, step {st.step + 1} (batch {st.batch} of the epoch, rank {self.rank})"
        try:
            terms = self.module.loss(batch, out)
        except RuntimeError as e:  # e.g. BCE refuses NaN probabilities before the guard below
            bad = [k for k, v in out.items() if torch.is_floating_point(v) and not torch.isfinite(v).all()]
            if bad:
                raise FloatingPointError(f"non-finite model outputs {bad} at {where}: {e}") from e
            raise
        value = float(terms["total"].detach())
        if not math.isfinite(value):
            detail = ", ".join(f"{k}={float(v.detach()):.6g}" for k, v in terms.items())
            raise FloatingPointError(f"non-finite loss at {where}: {detail}")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(terms["total"]).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            terms["total"].backward()
            self.optimizer.step()
        self.module.on_train_batch_end(batch, out)
        n = int(batch["click"].shape[0])
        st.loss_sum, st.samples = st.loss_sum + value * n, st.samples + n
        st.batch, st.step = st.batch + 1, st.step + 1

    def _validate(self) -> dict:
        from cvr_spark.evaluate.metrics import compute_metrics
        from cvr_spark.train import distributed as dd

        pred = predict(self.module, self.valid_loader, self.device)
        self.net.train()
        if self.world_size > 1:
            gathered = dd.gather_objects(pred, self.rank, self.world_size)
            pred = dd.merge_predictions(gathered) if self.rank == 0 else None
        metrics = None
        if self.rank == 0:
            metrics = plain(compute_metrics(pred, cvr_key=self.module.cvr_output,
                                            ctcvr_key=self.module.ctcvr_output))
        if self.world_size > 1:
            metrics = dd.broadcast_object(metrics, self.rank)
        return metrics

    def _end_epoch(self, elapsed: float) -> None:
        st, cfg = self.state, self.cfg
        metrics = self._validate()
        score = validation_score(metrics, cfg)
        loss_sum, samples = st.loss_sum, st.samples
        if self.world_size > 1:  # the epoch's training loss over every rank's rows
            from cvr_spark.train.distributed import all_reduce_sum

            loss_sum, samples = all_reduce_sum([loss_sum, samples], self.device)
        st.history.append({"epoch": st.epoch, "train_loss": loss_sum / max(samples, 1), "samples": int(samples),
                           "samples_per_s": samples / max(elapsed, 1e-9), "score": score, "valid": metrics})
        if _improved(score, st.best_score, cfg.early_stop_mode):
            st.best_score, st.best_epoch, st.bad_epochs = score, st.epoch, 0
            self.best_weights = ckpt.cpu_state_dict(self.module)
        else:
            st.bad_epochs += 1
        if self.rank == 0:
            log.info("epoch %d: %s=%.5f (best %.5f at epoch %d), %.0f samples/s", st.epoch,
                     cfg.early_stop_metric, score, st.best_score, st.best_epoch, st.history[-1]["samples_per_s"])
        self.module.on_epoch_end(st.epoch)
        st.epoch, st.batch, st.loss_sum, st.samples = st.epoch + 1, 0, 0.0, 0
        st.stopped_early = bool(cfg.patience and st.bad_epochs >= cfg.patience and st.epoch < cfg.epochs)
        st.done = st.stopped_early or st.epoch >= cfg.epochs or self._max_steps_reached()
        self._checkpoint()

    def _checkpoint(self) -> None:
        from cvr_spark.train import distributed as dd

        rng = ckpt.capture_rng()
        loop = self.state.to_dict()
        if self.world_size > 1:  # every rank's RNG state; the epoch's partial sums over every rank
            rngs = dd.gather_objects(rng, self.rank, self.world_size)
            loop["loss_sum"], samples = dd.all_reduce_sum([loop["loss_sum"], loop["samples"]], self.device)
            loop["samples"] = int(samples)
        else:
            rngs = [rng]
        if self.rank != 0:
            return
        ckpt.save_checkpoint(self.path, {
            "model": ckpt.cpu_state_dict(self.module), "optimizer": self.optimizer.state_dict(),
            "best_model": self.best_weights, "loop": plain(loop), "rng": rngs,
            "epoch": self.state.epoch, "step": self.state.step, "config": dataclasses.asdict(self.cfg),
            "table_versions": self.table_versions, "world_size": self.world_size, "meta": self.meta,
        })

    def _summary(self) -> dict:
        st = self.state
        best = next((h for h in st.history if h["epoch"] == st.best_epoch), {})
        return {"best_epoch": st.best_epoch, "best_score": st.best_score, "valid": best.get("valid", {}),
                "history": st.history, "epochs_run": st.epoch, "steps": st.step,
                "stopped_early": st.stopped_early, "checkpoint": str(self.path),
                "table_versions": self.table_versions}
