"""Shared multi-task blocks: experts, gates, MMoE / CGC / PLE backbones, task towers and
AITM-style token attention (MODELS.md §2, §4).

Shape letters: B batch, I input width, E experts, H expert / tower output width, T tokens,
K tasks. A *backbone* maps the flat input ``x`` [B, I] to one representation per task
(a list of K tensors [B, H_k]) and exposes their widths as ``out_dims``; :class:`TaskTowers`
turns those into one logit per task.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from cvr_spark.models.base import MLP

GATE_MODES = ("softmax", "masked")


class ExpertGroup(nn.Module):
    """``n`` independent MLP experts on the same input: [B, I] -> [B, n, H].

    Args:
        in_dim: input width I.
        n: number of experts (0 allowed: forward returns [B, 0, H]).
        dims: hidden widths of each expert (the last is H); ReLU after every layer.
        dropout: dropout rate(s) inside each expert.
    """

    def __init__(self, in_dim: int, n: int, dims: Sequence[int], dropout: float | Sequence[float] = 0.0) -> None:
        super().__init__()
        if not dims:
            raise ValueError("expert_dims must name at least one layer width")
        self.n, self.out_dim = n, int(dims[-1])
        self.experts = nn.ModuleList(MLP(in_dim, dims, dropout) for _ in range(n))

    def forward(self, x: Tensor) -> Tensor:
        if self.n == 0:
            return x.new_zeros(x.shape[0], 0, self.out_dim)  # [B, 0, H]
        return torch.stack([e(x) for e in self.experts], 1)  # [B, n, H]


class Gate(nn.Module):
    """Softmax gate over ``n`` experts: Linear(I -> n) then softmax. [B, I] -> [B, n]."""

    def __init__(self, in_dim: int, n: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, n)

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(self.linear(x), dim=-1)  # [B, n]


def mix(experts: Tensor, weights: Tensor) -> Tensor:
    """Weighted sum of expert outputs: experts [B, E, H], weights [B, E] -> [B, H]."""
    return (weights.unsqueeze(-1) * experts).sum(1)  # [B, H]


class SharedInput(nn.Module):
    """The trivial backbone: every task sees the input itself (ESMM-style towers)."""

    def __init__(self, in_dim: int, n_tasks: int) -> None:
        super().__init__()
        self.out_dims = [in_dim] * n_tasks

    def forward(self, x: Tensor) -> list[Tensor]:
        return [x] * len(self.out_dims)


class MMoE(nn.Module):
    """Multi-gate mixture of experts (MODELS.md §2); ``shared_gate=True`` gives OMoE.

    Each task k gets h_k = sum_e g_k,e(x) f_e(x) with g_k = softmax(W_k x + b_k).
    """

    def __init__(
        self,
        in_dim: int,
        n_tasks: int,
        n_experts: int,
        expert_dims: Sequence[int],
        dropout: float | Sequence[float] = 0.0,
        shared_gate: bool = False,
    ) -> None:
        super().__init__()
        if n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {n_experts}")
        self.n_tasks, self.shared_gate = n_tasks, shared_gate
        self.experts = ExpertGroup(in_dim, n_experts, expert_dims, dropout)
        self.gates = nn.ModuleList(Gate(in_dim, n_experts) for _ in range(1 if shared_gate else n_tasks))
        self.out_dims = [self.experts.out_dim] * n_tasks

    def forward(self, x: Tensor) -> list[Tensor]:
        experts = self.experts(x)  # [B, E, H]
        if self.shared_gate:
            return [mix(experts, self.gates[0](x))] * self.n_tasks
        return [mix(experts, g(x)) for g in self.gates]


class CGC(nn.Module):
    """One Customized Gate Control level (single-level PLE, MODELS.md §2).

    Experts are laid out as ``[specific of task 0, ..., specific of task K-1, shared]``.
    Task k's experts read task k's input; shared experts read the shared input.

    Args:
        in_dim: width of every input.
        n_specific: task-specific expert count per task (K entries; 0 allowed).
        n_shared: shared expert count.
        expert_dims / dropout: expert MLP widths and dropout.
        gate_mode: ``softmax``: task k's gate is a softmax over its own + shared experts
            (the paper, CTnoCVR Eq. 3-4). ``masked``: the CTnoCVR code's form: one softmax over
            *all* experts, then the other tasks' experts are masked out without renormalising.
        shared_output: also build a shared gate over all experts (PLE intermediate levels)
            whose mixture is returned as the next level's shared input.

    Raises:
        ValueError: a task with no expert at all, or an unknown ``gate_mode``.
    """

    def __init__(
        self,
        in_dim: int,
        n_specific: Sequence[int],
        n_shared: int,
        expert_dims: Sequence[int],
        dropout: float | Sequence[float] = 0.0,
        gate_mode: str = "softmax",
        shared_output: bool = False,
    ) -> None:
        super().__init__()
        if gate_mode not in GATE_MODES:
            raise ValueError(f"gate_mode must be one of {GATE_MODES}, got {gate_mode!r}")
        if any(m < 0 for m in n_specific) or n_shared < 0:
            raise ValueError(f"expert counts must be >= 0, got n_specific={list(n_specific)} n_shared={n_shared}")
        if any(m + n_shared < 1 for m in n_specific):
            raise ValueError(f"every task needs an expert: n_specific={list(n_specific)}, n_shared={n_shared}")
        self.gate_mode, self.n_tasks = gate_mode, len(n_specific)
        self.specific = nn.ModuleList(ExpertGroup(in_dim, m, expert_dims, dropout) for m in n_specific)
        self.shared = ExpertGroup(in_dim, n_shared, expert_dims, dropout)
        total = sum(n_specific) + n_shared
        own = torch.zeros(self.n_tasks, total, dtype=torch.bool)
        start = 0
        for k, m in enumerate(n_specific):
            own[k, start:start + m] = True
            start += m
        own[:, start:] = True
        self.register_buffer("own", own, persistent=False)  # [K, E_total]
        for k in range(self.n_tasks):  # task k's expert columns, for index_copy (no boolean-mask write,
            # whose data-dependent shape torch.compile cannot trace)
            self.register_buffer(f"own_idx{k}", own[k].nonzero().flatten(), persistent=False)
        width = total if gate_mode == "masked" else None
        self.gates = nn.ModuleList(Gate(in_dim, width or int(own[k].sum())) for k in range(self.n_tasks))
        self.shared_gate = Gate(in_dim, total) if shared_output else None
        self.out_dims = [self.shared.out_dim] * self.n_tasks

    def task_gate_weights(self, x_k: Tensor, k: int) -> Tensor:
        """Task k's weights over *all* experts [B, E_total] (0 outside its own and shared)."""
        g = self.gates[k](x_k)
        if self.gate_mode == "masked":
            return g * self.own[k].to(g.dtype)  # [B, E_total], not renormalised
        full = g.new_zeros(g.shape[0], self.own.shape[1])
        return full.index_copy(1, getattr(self, f"own_idx{k}"), g)  # [B, E_total]

    def forward(self, task_inputs: Sequence[Tensor], shared_input: Tensor) -> tuple[list[Tensor], Tensor | None]:
        """Returns (one mixture [B, H] per task, the shared mixture [B, H] or None)."""
        if len(task_inputs) != self.n_tasks:
            raise ValueError(f"CGC built for {self.n_tasks} tasks got {len(task_inputs)} task inputs")
        parts = [g(x) for g, x in zip(self.specific, task_inputs)] + [self.shared(shared_input)]
        experts = torch.cat(parts, 1)  # [B, E_total, H]
        outs = [mix(experts, self.task_gate_weights(x, k)) for k, x in enumerate(task_inputs)]
        shared = mix(experts, self.shared_gate(shared_input)) if self.shared_gate is not None else None
        return outs, shared


class PLE(nn.Module):
    """Progressive Layered Extraction: ``n_levels`` stacked CGC levels (MODELS.md §2).

    Intermediate levels also have a shared gate over all their experts, which feeds the next
    level's shared experts; the last level has task gates only. ``n_levels=1`` is CGC.
    """

    def __init__(
        self,
        in_dim: int,
        n_specific: Sequence[int],
        n_shared: int,
        expert_dims: Sequence[int],
        dropout: float | Sequence[float] = 0.0,
        gate_mode: str = "softmax",
        n_levels: int = 2,
    ) -> None:
        super().__init__()
        if n_levels < 1:
            raise ValueError(f"n_levels must be >= 1, got {n_levels}")
        self.n_tasks = len(n_specific)
        levels = []
        for lvl in range(n_levels):
            width = in_dim if lvl == 0 else int(expert_dims[-1])
            levels.append(CGC(width, n_specific, n_shared, expert_dims, dropout, gate_mode, lvl < n_levels - 1))
        self.levels = nn.ModuleList(levels)
        self.out_dims = levels[-1].out_dims

    def forward(self, x: Tensor) -> list[Tensor]:
        task_inputs: list[Tensor] = [x] * self.n_tasks
        shared: Tensor | None = x
        for level in self.levels:
            task_inputs, shared = level(task_inputs, shared)
        return task_inputs


class TaskTowers(nn.Module):
    """One MLP tower + Linear(H -> 1) head per task: K inputs [B, H_k] -> logits [B, K]."""

    def __init__(self, in_dims: Sequence[int], dims: Sequence[int], dropout: float | Sequence[float] = 0.0) -> None:
        super().__init__()
        self.towers = nn.ModuleList(MLP(d, dims, dropout, out_dim=1) for d in in_dims)

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        if len(inputs) != len(self.towers):
            raise ValueError(f"{len(self.towers)} towers got {len(inputs)} inputs")
        return torch.cat([t(x) for t, x in zip(self.towers, inputs)], 1)  # [B, K]


class TokenAttention(nn.Module):
    """AITM's attention over T tokens (MODELS.md §4): [B, T, H] -> [B, H].

    Q, K, V = X W_Q, X W_K, X W_V (H x H); a = softmax over tokens of <Q_t, K_t> / sqrt(H);
    output sum_t a_t V_t. AITM: no bias, weights N(0, 0.01^2). DDPO uses biased linears.

    Args:
        dim: token width H.
        bias: add a bias to the Q/K/V projections.
        init_std: normal init std of the projections; None keeps PyTorch's default init.
    """

    def __init__(self, dim: int, bias: bool = False, init_std: float | None = 0.01) -> None:
        super().__init__()
        self.dim = dim
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=bias) for _ in range(3))
        if init_std is not None:
            for lin in (self.q, self.k, self.v):
                nn.init.normal_(lin.weight, std=init_std)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.dim() != 3 or tokens.shape[-1] != self.dim:
            raise ValueError(f"TokenAttention expects [B, T, {self.dim}], got {tuple(tokens.shape)}")
        q, k, v = self.q(tokens), self.k(tokens), self.v(tokens)  # [B, T, H] each
        a = torch.softmax((q * k).sum(-1) / math.sqrt(self.dim), dim=1)  # [B, T]
        return (a.unsqueeze(-1) * v).sum(1)  # [B, H]

    def projection_weights(self) -> list[Tensor]:
        """The Q/K/V weight matrices (AITM puts them under L2)."""
        return [self.q.weight, self.k.weight, self.v.weight]
