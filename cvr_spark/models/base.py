"""Shared model interface and building blocks.

Shape letters: B batch, F single-valued fields, M multi-valued fields, L padded length,
D embedding dim, Z dense features.

**Batch** (a plain ``dict[str, Tensor]``, produced by the loader, keys fixed here):

=================  =================  ===================================================
key                dtype / shape      meaning
=================  =================  ===================================================
``sparse``         int32|int64 [B,F]  index per single-valued field (0 = OOV / missing)
``multi``          int32|int64 [B,M,L] padded indices of multi-valued fields (optional)
``multi_len``      int32|int64 [B,M]  true lengths of ``multi`` rows (optional)
``dense``          float32 [B,Z]      dense features (optional, e.g. rechub's 8 ``D*``)
``click``          float32 [B]        click label o
``conversion``     float32 [B]        conversion label r (0 wherever click is 0)
``user_key``       int64 [B]          hash of the raw user id (optional; GAUC)
``item_key``       int64 [B]          hash of the raw item id (optional)
=================  =================  ===================================================

Graph nodes (CSTWA) are the vocabulary indices of the user / item key fields, i.e. the
``sparse`` column of ``spec.user_key_field`` / ``spec.item_key_field``.

**Model interface**: ``forward(batch) -> dict`` with at least ``p_ctr``, ``p_cvr``,
``p_ctcvr`` (probabilities, shape [B]) plus whatever the model's losses need;
``loss(batch, out) -> dict`` of named loss terms (scalars) plus ``total``. Every model
states, in ``cvr_output`` / ``ctcvr_output``, which output is the post-click CVR score and
which the impression-level CTCVR score (MODELS.md §12-13: AITM and CSTWA's purchase head
is an impression-level score, so their ``p_cvr`` entry is that head and they say so).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import ClassVar, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

Batch = Mapping[str, Tensor]
EMBEDDING_OPTIMIZERS = ("lazy_adam", "adam")  # ModelConfig.embedding_optimizer (cvr_spark.train.optim)


@dataclass(frozen=True)
class FeatureSpec:
    """What the trainer knows about the input: built from the feature job's manifest.

    Args:
        sparse_fields: names of single-valued fields, in the column order of ``batch['sparse']``.
        sparse_vocab: vocabulary size per single-valued field (index 0 included).
        multi_fields / multi_vocab: the same for multi-valued fields (``batch['multi']``).
        dense_fields: names of the dense float features (``batch['dense']``).
        groups: field name -> ``user`` / ``item`` / ``context``.
        user_key_field / item_key_field: the id fields that key users and items.
    """

    sparse_fields: tuple[str, ...]
    sparse_vocab: tuple[int, ...]
    multi_fields: tuple[str, ...] = ()
    multi_vocab: tuple[int, ...] = ()
    dense_fields: tuple[str, ...] = ()
    groups: Mapping[str, str] = field(default_factory=dict)
    user_key_field: str = "101"
    item_key_field: str = "205"

    def __post_init__(self) -> None:
        if len(self.sparse_fields) != len(self.sparse_vocab):
            raise ValueError("sparse_fields and sparse_vocab differ in length")
        if len(self.multi_fields) != len(self.multi_vocab):
            raise ValueError("multi_fields and multi_vocab differ in length")
        if any(v < 1 for v in (*self.sparse_vocab, *self.multi_vocab)):
            raise ValueError("every vocabulary has at least index 0")

    @property
    def num_fields(self) -> int:
        return len(self.sparse_fields) + len(self.multi_fields)

    @property
    def all_fields(self) -> tuple[str, ...]:
        return self.sparse_fields + self.multi_fields

    def fields_in(self, group: str) -> list[str]:
        return [f for f in self.all_fields if self.groups.get(f, "context") == group]

    @classmethod
    def from_manifest(cls, manifest: Mapping) -> "FeatureSpec":
        """Build from the feature job's ``manifest.json`` (see cvr_spark.data.features)."""
        fields = manifest["fields"]
        single = [f for f in fields if not f.get("multi")]
        multi = [f for f in fields if f.get("multi")]
        return cls(
            sparse_fields=tuple(f["name"] for f in single),
            sparse_vocab=tuple(int(f["vocab_size"]) for f in single),
            multi_fields=tuple(f["name"] for f in multi),
            multi_vocab=tuple(int(f["vocab_size"]) for f in multi),
            dense_fields=tuple(manifest.get("dense_fields", ())),
            groups={f["name"]: f["group"] for f in fields},
            user_key_field=manifest.get("user_key_field", "101"),
            item_key_field=manifest.get("item_key_field", "205"),
        )


def sum_rows(rows: Tensor, grad: Tensor, num_rows: int | None = None) -> tuple[Tensor, Tensor]:
    """Sum ``grad`` [n, D] over equal ``rows`` [n]: (distinct rows [U] ascending, sums [U, D]).

    One sort of the row indices (as int32 when ``num_rows`` < 2^31), then the sums as a sparse
    [U, n] 0/1 matrix (row u selects the lookups of distinct row u) times ``grad``: on 2 CPU
    cores about 3x faster than ``torch.unique(return_inverse=True)`` + ``index_add_`` for a
    2000 x 18 batch.
    """
    key = rows.int() if num_rows is not None and num_rows < 2**31 else rows
    ordered, perm = torch.sort(key)
    distinct, counts = torch.unique_consecutive(ordered, return_counts=True)  # [U], [U]
    crow = counts.new_zeros(distinct.numel() + 1)
    torch.cumsum(counts, 0, out=crow[1:])
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.filterwarnings("ignore", message=".*[Ss]parse CSR.*")
        select = torch.sparse_csr_tensor(crow, perm, grad.new_ones(rows.numel()),
                                         (distinct.numel(), rows.numel()), check_invariants=False)
        sums = select @ grad  # [U, D]
    return distinct.long(), sums


class RowGradient:
    """The gradient of an embedding table kept as rows, for a row-wise (lazy) optimiser.

    While a :class:`RowGradient` is attached to an :class:`EmbeddingArch`
    (:meth:`EmbeddingArch.attach_row_gradient`, done by ``cvr_spark.train.optim``), the backward
    pass of a lookup hands the looked-up rows [n] and their output gradient [n, D] to :meth:`add`
    instead of building the dense [N, D] ``weight.grad`` (a zero fill of the whole table plus
    a scatter, every step). The optimiser reads them summed per distinct row (:meth:`collect`)
    and updates only those rows, so a step costs in proportion to the batch's lookups, not to
    the table. Nothing is recorded by a forward pass that is never backpropagated.
    """

    def __init__(self) -> None:
        self.parts: list[tuple[Tensor, Tensor]] = []  # (looked-up rows [n], output gradient [n, D])
        self.num_rows: int | None = None  # rows of the table

    def add(self, rows: Tensor, grad: Tensor, num_rows: int) -> None:
        """Record the gradient ``grad`` [n, D] of the lookups of rows ``rows`` [n] of a table of
        ``num_rows`` rows (called from backward)."""
        self.parts.append((rows, grad))
        self.num_rows = num_rows

    def collect(self) -> tuple[Tensor, Tensor] | None:
        """(distinct rows [U], summed gradient [U, D]) of the pending backward passes, or None;
        forgets them."""
        parts, self.parts = self.parts, []
        if not parts or not any(r.numel() for r, _ in parts):
            return None
        if len(parts) == 1:
            return sum_rows(*parts[0], self.num_rows)
        return sum_rows(torch.cat([r for r, _ in parts]), torch.cat([g for _, g in parts]), self.num_rows)

    def clear(self) -> None:
        """Drop the pending gradients (``optimizer.zero_grad``)."""
        self.parts = []


class _RowLookup(torch.autograd.Function):
    """``weight[rows]`` whose backward hands the rows' gradient to a :class:`RowGradient`
    instead of accumulating a dense ``weight.grad``. ``keep`` [n] (bool or None) marks the
    lookups to report (padding of multi-valued fields is not reported)."""

    @staticmethod
    def forward(ctx, weight: Tensor, rows: Tensor, sink: RowGradient, keep: Tensor | None) -> Tensor:
        ctx.sink, ctx.num_rows = sink, weight.shape[0]
        ctx.save_for_backward(rows, keep)
        return weight.index_select(0, rows)  # [n, D]

    @staticmethod
    def backward(ctx, grad: Tensor):
        rows, keep = ctx.saved_tensors
        if keep is not None:
            rows, grad = rows[keep], grad[keep]
        ctx.sink.add(rows, grad, ctx.num_rows)
        return None, None, None, None


@torch.compiler.disable
def _row_lookup(weight: Tensor, rows: Tensor, sink: RowGradient, keep: Tensor | None) -> Tensor:
    """:class:`_RowLookup` run eagerly under ``torch.compile`` (``train.compile``): its backward
    hands rows to a Python object, which a compiled graph cannot hold; the graph breaks here."""
    return _RowLookup.apply(weight, rows, sink, keep)


class EmbeddingArch(nn.Module):
    """One embedding table for all fields, with per-field offsets (one lookup per kind).

    Multi-valued fields are pooled per field (``sum`` or ``mean`` over their true length).
    Output of :meth:`forward`: field embeddings ``[B, F+M, D]`` in the order
    ``spec.all_fields``; :meth:`flat` concatenates them with the dense features into
    ``[B, (F+M)*D + Z]``.

    By default the table is an ordinary ``nn.Embedding`` (dense ``table.weight.grad``, any
    optimiser). A row-wise optimiser attaches a :class:`RowGradient` instead
    (:meth:`attach_row_gradient`); the lookups' gradients then go there and ``table.weight.grad``
    stays None (a dense gradient from elsewhere, e.g. an L2 term on the whole table, still
    lands in ``table.weight.grad``).
    """

    def __init__(self, spec: FeatureSpec, dim: int, pooling: str = "sum") -> None:
        super().__init__()
        if pooling not in ("sum", "mean"):
            raise ValueError(f"pooling must be 'sum' or 'mean', got {pooling!r}")
        self.spec, self.dim, self.pooling = spec, dim, pooling
        sizes = list(spec.sparse_vocab) + list(spec.multi_vocab)
        offsets = torch.tensor([0] + sizes[:-1], dtype=torch.long).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)
        self.table = nn.Embedding(sum(sizes), dim)
        nn.init.normal_(self.table.weight, std=0.01)
        self.row_gradient: RowGradient | None = None

    @property
    def out_dim(self) -> int:
        return self.spec.num_fields * self.dim + len(self.spec.dense_fields)

    def attach_row_gradient(self, sink: RowGradient | None) -> None:
        """Route the lookups' gradients to ``sink`` (None: back to the dense ``weight.grad``)."""
        self.row_gradient = sink

    def lookup(self, idx: Tensor, field_offset: Tensor, valid: Tensor | None = None) -> Tensor:
        """Embed field-local indices ``idx`` [..., F] whose fields start at ``field_offset`` [F].

        ``valid`` (bool, broadcastable to ``idx``): the slots that are real lookups (padding of
        multi-valued fields is not); only used to tell a row-wise optimiser which rows were read.
        """
        rows = idx.long() + field_offset  # [..., F]
        weight = self.table.weight
        if self.row_gradient is None or not (torch.is_grad_enabled() and weight.requires_grad):
            return F.embedding(rows, weight)
        keep = None if valid is None else torch.broadcast_to(valid, rows.shape).reshape(-1)
        out = _row_lookup(weight, rows.reshape(-1), self.row_gradient, keep)  # [n, D]
        return out.view(*rows.shape, self.dim)

    def forward(self, batch: Batch) -> Tensor:
        nf = len(self.spec.sparse_fields)
        parts = [self.lookup(batch["sparse"], self.offsets[:nf])]  # [B, F, D]
        if self.spec.multi_fields:
            vals = batch["multi"].long()  # [B, M, L]
            lens = batch["multi_len"]  # [B, M]
            steps = torch.arange(vals.shape[-1], device=vals.device)
            valid = steps.view(1, 1, -1) < lens.unsqueeze(-1)  # [B, M, L]
            emb = self.lookup(vals, self.offsets[nf:].view(1, -1, 1), valid)  # [B, M, L, D]
            mask = valid.to(emb.dtype)  # [B, M, L]
            pooled = (emb * mask.unsqueeze(-1)).sum(2)  # [B, M, D]
            if self.pooling == "mean":
                pooled = pooled / lens.to(emb.dtype).clamp_min(1).unsqueeze(-1)
            parts.append(pooled)
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)  # [B, F+M, D]

    def flat(self, batch: Batch, emb: Tensor | None = None) -> Tensor:
        """Concatenate field embeddings (computed unless given) and dense features."""
        emb = self.forward(batch) if emb is None else emb
        x = emb.flatten(1)  # [B, (F+M)*D]
        if self.spec.dense_fields:
            x = torch.cat([x, batch["dense"].to(x.dtype)], 1)
        return x


class FastDropout(nn.Module):
    """Inverted dropout whose CPU mask comes from random bytes: ``keep = byte >= round(p * 256)``.

    PyTorch's CPU dropout draws one Bernoulli variate per element (``bernoulli_``), which is
    most of an ESMM training step on CPU (about 7 of 20 ms per 2000-row batch on 2 cores);
    eight mask bytes per 64-bit draw make it about 5x cheaper. The drop rate is quantised to
    1/256 (0.3 -> 77/256 = 0.3008) and the kept values are scaled by the exact 1 / (1 - p')
    of that rate, so the layer stays unbiased. On CUDA, and in eval mode, it is ``F.dropout``.
    Seeded by ``torch.manual_seed`` like every other CPU draw.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {p}")
        self.p = float(p)
        self.threshold = round(self.p * 256)  # drop when a uniform byte < threshold
        self.scale = 256.0 / (256 - self.threshold)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.threshold == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)
        return x * self.keep_mask(x.shape, x.dtype)

    def keep_mask(self, shape: torch.Size, dtype: torch.dtype) -> Tensor:
        """A fresh CPU mask of ``shape``: ``scale`` where the random byte is >= ``threshold``, else 0."""
        n = shape.numel()
        words = torch.randint(-(2 ** 63), 2 ** 63 - 1, ((n + 7) // 8,), dtype=torch.int64)
        byte = words.view(torch.uint8)[:n].view(shape).to(dtype)  # 0..255, exact in any float dtype
        # keep = (byte >= threshold) * scale, in arithmetic: (byte - (threshold - 1)) clamped to
        # [0, 1] is 0 below the threshold and 1 from it on. On CPU this is several times faster
        # than a comparison (its bool output) plus a bool -> float cast; the mask is the same.
        return byte.sub_(self.threshold - 1).clamp_(0.0, 1.0).mul_(self.scale)

    def extra_repr(self) -> str:
        return f"p={self.p} (as {self.threshold}/256)"


class _ReLUDropout(torch.autograd.Function):
    """``FastDropout(relu(x))`` on CPU in one node: y = relu(x) * keep, computed in place on
    relu's output; backward g * scale where y > 0 (kept and positive), from y alone. The same
    values and the same random draw as the two modules, with fewer passes over the activations
    (on 2 cores the passes over [2000, 128] activations, not the FLOPs, are what they cost)."""

    @staticmethod
    def forward(ctx, x: Tensor, drop: FastDropout) -> Tensor:
        y = torch.relu(x).mul_(drop.keep_mask(x.shape, x.dtype))
        ctx.save_for_backward(y)
        ctx.scale = drop.scale
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        (y,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(grad, y, 0.0).mul_(ctx.scale), None


class MLP(nn.Module):
    """Linear -> ReLU -> Dropout blocks (the AITM/CSTWA tower: 128-64-32, dropout .1/.3/.3).

    Args:
        in_dim: input width.
        dims: hidden widths.
        dropout: one rate per layer, or a single rate for all.
        batch_norm: insert BatchNorm1d after each Linear (DDPO's bottoms use it).
        out_dim: if given, a final Linear(dims[-1] -> out_dim) with no activation (logits).
    """

    def __init__(
        self,
        in_dim: int,
        dims: Sequence[int],
        dropout: float | Sequence[float] = 0.0,
        batch_norm: bool = False,
        out_dim: int | None = None,
    ) -> None:
        super().__init__()
        rates = [dropout] * len(dims) if isinstance(dropout, (int, float)) else list(dropout)
        if len(rates) != len(dims):
            raise ValueError(f"{len(rates)} dropout rates for {len(dims)} layers")
        layers: list[nn.Module] = []
        width = in_dim
        for d, r in zip(dims, rates):
            layers.append(nn.Linear(width, d))
            if batch_norm:
                layers.append(nn.BatchNorm1d(d))
            layers.append(nn.ReLU())
            if r > 0:
                layers.append(FastDropout(r))
            width = d
        if out_dim is not None:
            layers.append(nn.Linear(width, out_dim))
            width = out_dim
        self.net = nn.Sequential(*layers)
        self.out_dim = width
        # ReLU -> FastDropout pairs, run as one node in CPU training (_ReLUDropout)
        self._fused = frozenset(i for i in range(len(layers) - 1)
                                if isinstance(layers[i], nn.ReLU) and isinstance(layers[i + 1], FastDropout))

    def forward(self, x: Tensor) -> Tensor:
        if not (self._fused and self.training and x.device.type == "cpu"):
            return self.net(x)
        layers, i = self.net, 0
        while i < len(layers):
            if i in self._fused:
                x = _ReLUDropout.apply(x, layers[i + 1])
                i += 2
            else:
                x = layers[i](x)
                i += 1
        return x


@dataclass
class ModelConfig:
    """Options shared by every model; model families subclass it with their own options.

    Presets live in ``conf/models/*.yaml``; unknown keys are rejected when loading.
    """

    embedding_dim: int = 5
    tower_dims: list[int] = field(default_factory=lambda: [128, 64, 32])
    dropout: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.3])
    pooling: str = "sum"
    lr: float = 1e-3
    batch_size: int = 2000
    # L2 as Adam weight_decay on all parameters (MODELS.md §9.5: AITM regularises only
    # embeddings + attention; weight_decay on everything is the usual substitute).
    weight_decay: float = 1e-6
    # How the embedding tables are optimised (cvr_spark.train.optim): "lazy_adam" updates only
    # the rows a batch looks up (their m, v and weight; weight_decay on those rows only; bias
    # correction by the global step), as TF LazyAdam / TorchRec EXACT_ADAM; "adam" is dense
    # Adam on every row every step (decays untouched rows' moments and weights too).
    embedding_optimizer: str = "lazy_adam"


class CVRModel(nn.Module):
    """Base class of every registered model.

    Subclasses set the class attributes below and implement :meth:`forward` and
    :meth:`loss`. ``cvr_output`` names the output that is a post-click CVR score
    (P(buy | click)); ``ctcvr_output`` the impression-level P(click & buy) score.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    config_cls: ClassVar[type] = ModelConfig
    cvr_output: ClassVar[str] = "p_cvr"
    ctcvr_output: ClassVar[str] = "p_ctcvr"

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig) -> None:
        super().__init__()
        self.spec, self.cfg = spec, cfg

    def forward(self, batch: Batch) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, batch: Batch, out: Mapping[str, Tensor]) -> dict[str, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def on_train_batch_end(self, batch: Batch, out: Mapping[str, Tensor]) -> None:
        """Hook after each optimiser step (stateful models, e.g. CSTWA's CTR buffer)."""

    def on_epoch_end(self, epoch: int) -> None:
        """Hook after each training epoch (e.g. CSTWA option B's table update)."""

    def options(self) -> dict:
        """The decisions this model runs with (logged with every run)."""
        from dataclasses import asdict

        return asdict(self.cfg)


def head(in_dim: int) -> nn.Linear:
    """A Linear(in_dim -> 1) output layer producing a logit."""
    return nn.Linear(in_dim, 1)
