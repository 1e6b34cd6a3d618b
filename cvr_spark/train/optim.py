"""The training optimiser: Adam, with row-wise ("lazy") Adam for the embedding tables.

``make_optimizer(model)`` builds what the training loop (and the throughput benchmark) steps,
after the model's ``embedding_optimizer`` option:

* ``lazy_adam`` (default): :class:`LazyEmbeddingAdam`. Dense parameters (towers, gates, heads)
  get PyTorch's fused Adam with the model's ``lr`` / ``weight_decay``, exactly as before. Every
  :class:`~cvr_spark.models.base.EmbeddingArch` table is updated row-wise, like TensorFlow's
  ``LazyAdam`` and TorchRec's fused ``EXACT_ADAM``: in a step only the rows looked up by the
  batch (summed over duplicates) get their moments m, v and their weight updated, with Adam's
  bias correction by the global step (the number of optimiser steps so far); the L2 term
  ``weight_decay * w`` is added to the gradient of those rows only. Rows not looked up keep
  their weight *and* their moments (dense Adam would decay m, v and keep moving such a row on
  its stale momentum, and would apply weight decay to it). The cost of a step is proportional
  to the batch's lookups instead of the 1.1M-row table: no [N, D] gradient, no pass over N rows.
* ``adam``: ``torch.optim.Adam`` on every parameter (dense gradients; the previous behaviour).

When every row is looked up in every step the two are the same update. The lazy optimiser's
state is Adam's (``step``, ``exp_avg``, ``exp_avg_sq`` per parameter), in ``state_dict()``.

**DDP.** DDP all-reduces dense gradients only. :func:`prepare_ddp` takes the row-wise tables out
of DDP (``_set_params_and_buffers_to_ignore_for_model``), broadcasts them from rank 0, and makes
the optimiser all-gather every rank's looked-up rows and all-reduce (mean, as DDP) their summed
gradients before the update, so every rank updates the same rows with the same values and the
replicas stay identical. Device-agnostic (gloo on CPU, NCCL on CUDA).
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from cvr_spark.models.base import EMBEDDING_OPTIMIZERS, EmbeddingArch, RowGradient, sum_rows

log = logging.getLogger(__name__)



def _union_rows(rows: Optional[Tensor], grad: Optional[Tensor], dim: int, num_rows: int, device: torch.device,
                group: Any) -> Optional[tuple[Tensor, Tensor]]:
    """Every rank's distinct looked-up rows [U] (ascending) and their gradient [U, D] averaged over
    ranks (DDP's mean), the same tensors on every rank. ``rows`` [n]: this rank's distinct rows.

    Two collectives: the ranks' row counts, then every rank's (rows, gradients) packed in one
    float32 tensor (the int64 rows bit-cast to two float32 columns). Each rank then sums the
    same gathered values the same way, so the result is bit-identical on every rank: on CPU with
    one sort and a sparse sum (:func:`~cvr_spark.models.base.sum_rows`), on CUDA in rank order
    with one ``index_add_`` per rank (a rank's rows are distinct, so no two additions of one call
    hit the same row: deterministic despite atomics).
    """
    import torch.distributed as dist

    world = dist.get_world_size(group)
    n = torch.tensor([0 if rows is None else rows.numel()], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    counts = [int(c) for c in sizes]
    if max(counts) == 0:
        return None
    packed = torch.zeros(max(counts), 2 + dim, dtype=torch.float32, device=device)
    if rows is not None:
        packed[: rows.numel(), :2] = rows.contiguous().view(torch.float32).view(-1, 2)  # bits, not values
        packed[: rows.numel(), 2:] = grad
    parts = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(parts, packed, group=group)
    ranks = [(p[:c, :2].contiguous().view(torch.int64).view(-1), p[:c, 2:]) for p, c in zip(parts, counts)]
    every = torch.cat([r for r, _ in ranks])
    if device.type == "cpu":  # one sort + a sparse sum, deterministic on CPU
        union, total = sum_rows(every, torch.cat([g for _, g in ranks]), num_rows)
    else:  # CUDA: no floating-point atomics race (each call adds distinct rows), rank order
        union = torch.unique_consecutive(torch.sort(every)[0])
        total = torch.zeros(union.numel(), dim, dtype=torch.float32, device=device)
        for r, g in ranks:
            total.index_add_(0, torch.searchsorted(union, r), g)
    return union, total.div_(world).to(grad.dtype if grad is not None else torch.float32)


def _all_reduce_mean(t: Tensor, group: Any) -> Tensor:
    import torch.distributed as dist

    dist.all_reduce(t, group=group)
    return t.div_(dist.get_world_size(group))


class LazyEmbeddingAdam(torch.optim.Adam):
    """Adam for dense parameters plus row-wise (lazy) Adam for embedding tables (module docstring).

    Args:
        dense_params: the parameters updated by ``torch.optim.Adam`` (dense gradients).
        tables: the embedding tables updated row-wise; a :class:`RowGradient` is attached to each.
        lr, betas, eps, weight_decay, fused: Adam's options, shared by both kinds.

    The per-row update of a table, for the looked-up rows r (g: summed gradient, t: global step)::

        g = g + weight_decay * w[r]
        m[r] = beta1 m[r] + (1 - beta1) g;   v[r] = beta2 v[r] + (1 - beta2) g^2
        w[r] -= lr / (1 - beta1^t) * m[r] / (sqrt(v[r] / (1 - beta2^t)) + eps)

    The rows are the distinct rows the batch looked up (the lookup deduplicates them, see
    :class:`~cvr_spark.models.base.RowGradient`). A dense gradient that reaches a table's ``weight.grad`` from elsewhere
    (e.g. AITM's L2 term over the whole table) touches every row: that step is dense Adam.
    """

    def __init__(self, dense_params: Iterable[nn.Parameter], tables: Sequence[EmbeddingArch], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 fused: Optional[bool] = None, param_order: Optional[Sequence[nn.Parameter]] = None) -> None:
        dense = list(dense_params)
        # model.parameters() order: lets load_state_dict read a dense torch.optim.Adam state
        self._param_order = list(param_order) if param_order is not None else None
        groups = ([{"params": dense}] if dense else []) + [
            {"params": [t.table.weight], "lazy": True} for t in tables]
        super().__init__(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)
        self._sinks: dict[nn.Parameter, RowGradient] = {}
        for t in tables:
            sink = RowGradient()
            t.attach_row_gradient(sink)
            self._sinks[t.table.weight] = sink
        self._packed: dict[nn.Parameter, Tensor] = {}  # table -> its m, v as one [N, 2, D] tensor
        self._group: Any = None
        self._distributed = False
        self._warned_dense = False

    def load_state_dict(self, state_dict: dict) -> None:
        """Adam's ``load_state_dict``; also reads a one-group ``torch.optim.Adam`` state over
        ``model.parameters()`` (``embedding_optimizer: adam``, or a checkpoint from before the
        row-wise optimiser) when built with ``param_order``: the moments and steps carry over."""
        groups = state_dict["param_groups"]
        if len(groups) == 1 and len(self.param_groups) > 1 and self._param_order is not None:
            state_dict = self._from_dense_adam(state_dict)
        super().load_state_dict(state_dict)

    def _from_dense_adam(self, state_dict: dict) -> dict:
        (old,) = state_dict["param_groups"]
        if len(old["params"]) != len(self._param_order):
            raise ValueError(f"optimizer state has {len(old['params'])} parameters, the model {len(self._param_order)}")
        position = {id(p): i for i, p in enumerate(self._param_order)}
        ours = [p for g in self.param_groups for p in g["params"]]
        state = {}
        for i, p in enumerate(ours):
            key = old["params"][position[id(p)]]
            if key in state_dict["state"]:
                state[i] = state_dict["state"][key]
        groups, start = [], 0
        for g in self.param_groups:
            options = {k: v for k, v in old.items() if k != "params"}
            if g.get("lazy"):
                options["lazy"] = True
            groups.append({**options, "params": list(range(start, start + len(g["params"])))})
            start += len(g["params"])
        return {"state": state, "param_groups": groups}

    def sync_rows_across_ranks(self, process_group: Any = None) -> None:
        """All-reduce the tables' row gradients over ``process_group`` in every step (DDP)."""
        self._distributed, self._group = True, process_group

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for sink in self._sinks.values():
            sink.clear()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        lazy = [g for g in self.param_groups if g.get("lazy")]
        stashed = {}
        for group in lazy:  # Adam below must not see the tables (their dense grad is folded in here)
            for p in group["params"]:
                if p.grad is not None:
                    stashed[p], p.grad = p.grad, None
        try:
            super().step()
            for group in lazy:
                for p in group["params"]:
                    self._table_step(group, p, stashed.get(p))
        finally:
            for p, g in stashed.items():
                p.grad = g
        return loss

    def _state(self, group: dict, p: Tensor) -> tuple[dict, Tensor]:
        """The table's Adam state and its moments packed as one [N, 2, D] tensor.

        ``state['exp_avg']`` / ``state['exp_avg_sq']`` are the two halves (views) of the packed
        tensor, so that ``state_dict()`` reads like Adam's while a step gathers and scatters each
        looked-up row's m and v together (one random access instead of two). State loaded by
        ``load_state_dict`` (separate tensors) is packed again on the next step.
        """
        state = self.state[p]
        if not state:
            on_device = group["fused"] or group["capturable"]
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")
            packed = torch.zeros(p.shape[0], 2, *p.shape[1:], dtype=p.dtype, device=p.device)
        else:
            packed = self._packed.get(p)
            if packed is not None and state["exp_avg"].data_ptr() == packed.data_ptr():
                return state, packed
            packed = torch.stack([state["exp_avg"], state["exp_avg_sq"]], 1).to(p.device, p.dtype)
        state["exp_avg"], state["exp_avg_sq"] = packed[:, 0], packed[:, 1]
        self._packed[p] = packed
        return state, packed

    def _table_step(self, group: dict, p: Tensor, dense_grad: Optional[Tensor]) -> None:
        pending = self._sinks[p].collect()  # (distinct rows [U], summed gradient [U, D]) or None
        state, packed = self._state(group, p)
        state["step"] += 1  # the global step, whether or not this table was looked up
        if dense_grad is not None:
            self._dense_table_step(group, p, state, packed, dense_grad, pending)
            return
        if self._distributed:
            rows, grad = pending if pending is not None else (None, None)
            pending = _union_rows(rows, grad, p.shape[1], p.shape[0], p.device, self._group)
        if pending is not None:
            self._update_rows(group, p, state, packed, *pending)

    def _update_rows(self, group: dict, p: Tensor, state: dict, packed: Tensor, rows: Optional[Tensor],
                     grad: Tensor) -> None:
        """Adam on the distinct rows ``rows`` [U] (None: every row) with their gradient [U, D]."""
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        w = p if rows is None else p.index_select(0, rows)  # [U, D]; every row: in place
        mv = packed if rows is None else packed.index_select(0, rows)  # [U, 2, D]
        m, v = mv[:, 0].contiguous(), mv[:, 1].contiguous()  # element-wise ops on strided views are ~5x slower
        grad = grad.to(p.dtype)
        if wd:
            grad = grad.add(w, alpha=wd)
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = state["step"].to(p.device, torch.float32)
        bias1 = 1 - beta1 ** step  # 0-dim tensors: no host sync on CUDA
        bias2_sqrt = (1 - beta2 ** step).sqrt()
        denom = (v.sqrt() / bias2_sqrt).add_(eps)
        w.sub_(m / denom * (lr / bias1))
        if rows is None:
            packed[:, 0].copy_(m)
            packed[:, 1].copy_(v)
        else:
            p.index_copy_(0, rows, w)
            packed.index_copy_(0, rows, torch.stack([m, v], 1))

    def _dense_table_step(self, group: dict, p: Tensor, state: dict, packed: Tensor, dense_grad: Tensor,
                          pending: Optional[tuple[Tensor, Tensor]]) -> None:
        """Every row is touched: a dense gradient plus the lookups' rows -> a dense Adam step."""
        if not self._warned_dense:
            log.info("embedding table %s received a dense gradient (e.g. an L2 term over the whole "
                     "table): every row is updated in such steps", tuple(p.shape))
            self._warned_dense = True
        grad = dense_grad.clone()
        if pending is not None:
            grad.index_add_(0, pending[0], pending[1].to(grad.dtype))
        if self._distributed:
            grad = _all_reduce_mean(grad, self._group)
        self._update_rows(group, p, state, packed, None, grad)


def embedding_tables(model: nn.Module) -> list[EmbeddingArch]:
    """The model's trainable :class:`EmbeddingArch` tables (module order)."""
    return [m for m in model.modules() if isinstance(m, EmbeddingArch) and m.table.weight.requires_grad]


def make_optimizer(model: Any, embedding_optimizer: Optional[str] = None) -> torch.optim.Optimizer:
    """The optimiser of ``model``: Adam with its ``lr`` and ``weight_decay``; embedding tables
    row-wise under ``lazy_adam`` (the model's ``embedding_optimizer`` unless given here).

    Dense Adam uses PyTorch's fused kernel where the device has one (CUDA; CPU since torch 2.4):
    one pass instead of a Python loop of small ops per tensor.

    Raises:
        ValueError: an unknown ``embedding_optimizer``.
    """
    choice = embedding_optimizer or getattr(model.cfg, "embedding_optimizer", "adam")
    if choice not in EMBEDDING_OPTIMIZERS:
        raise ValueError(f"model.embedding_optimizer: expected one of {EMBEDDING_OPTIMIZERS}, got {choice!r}")
    tables = embedding_tables(model)
    for t in tables:
        t.attach_row_gradient(None)  # dense gradients unless the lazy optimiser takes them over
    kw = dict(lr=model.cfg.lr, weight_decay=model.cfg.weight_decay)
    if choice == "adam" or not tables:
        try:
            return torch.optim.Adam(model.parameters(), fused=True, **kw)
        except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device / dtype
            return torch.optim.Adam(model.parameters(), **kw)
    lazy = {id(t.table.weight) for t in tables}
    dense = [p for p in model.parameters() if id(p) not in lazy]
    order = list(model.parameters())
    try:
        return LazyEmbeddingAdam(dense, tables, fused=True, param_order=order, **kw)
    except (RuntimeError, TypeError, ValueError):
        return LazyEmbeddingAdam(dense, tables, param_order=order, **kw)


def row_wise_parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names (``model.named_parameters``) of the parameters ``optimizer`` updates row-wise."""
    if not isinstance(optimizer, LazyEmbeddingAdam):
        return []
    lazy = {id(p) for p in optimizer._sinks}
    return [name for name, p in model.named_parameters() if id(p) in lazy]


def prepare_ddp(model: nn.Module, optimizer: torch.optim.Optimizer, process_group: Any = None) -> list[str]:
    """Call before wrapping ``model`` in DDP. The row-wise tables leave DDP's gradient all-reduce
    (the optimiser all-reduces their looked-up rows instead) and are broadcast from rank 0, as
    DDP does with the parameters it manages. Non-persistent buffers leave DDP's per-forward
    buffer broadcast: in this package they are constants computed from the spec and config
    (``EmbeddingArch.offsets``, ``CGC.own``), equal on every rank; trained state (CSTWA's CTR
    FIFO) is in persistent buffers, which DDP keeps broadcasting. Returns the names taken out."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    names = row_wise_parameter_names(model, optimizer)
    constants = [f"{prefix}{'.' if prefix else ''}{name}" for prefix, module in model.named_modules()
                 for name in module._non_persistent_buffers_set]
    if names or constants:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names + constants)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            dist.broadcast(params[name].data, src=0, group=process_group)
    if names:
        optimizer.sync_rows_across_ranks(process_group)
    return names + constants
