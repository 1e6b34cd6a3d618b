"""CSTWA (arXiv 2304.01169, ECML-PKDD'23): Structure Migrator, Click Perceptron, Curse Escaper.

MODELS.md §9.5 is the specification; every [I] reconstruction there is an option of
:class:`CSTWAConfig`. Graph construction (pre-trained CTR embeddings -> FAISS top-K ->
:func:`~cvr_spark.models.cstwa_graph.normalize_adjacency`) is the graph job's; this module
consumes the result through :meth:`CSTWA.set_graphs`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Mapping

import torch
from torch import Tensor, nn

from cvr_spark import losses
from cvr_spark.models.base import MLP, Batch, CVRModel, EmbeddingArch, FeatureSpec, ModelConfig, head
from cvr_spark.models.cstwa_graph import NeighbourTable, StructureGraph, gather_rows, graph_fields
from cvr_spark.models.esmm import check_tower_config
from cvr_spark.models.registry import register

GROUPS = ("user", "item")


@dataclass
class CSTWAConfig(ModelConfig):
    """CSTWA options (MODELS.md §9.1 paper values as defaults; [I] marks reconstructions).

    L2 1e-6 is Adam ``weight_decay`` on all parameters (ModelConfig), not an explicit term.
    """

    ctr_weight: float = 1.0  # λ1
    cvr_weight: float = 1.0  # λ2
    calibrator_weight: float = 0.6  # λ3
    # Ablation switches (paper Table 3): SM / CP / CE.
    structure_migrator: bool = True
    click_perceptron: bool = True
    curse_escaper: bool = True
    # Structure Migrator. "A": per batch, in the autograd graph; "B": per-node tables updated
    # after each epoch [I]. sm_layers = L (A costs K^L neighbour lookups per row: L <= 3).
    sm_mode: str = "A"
    sm_alpha: float = 0.3
    sm_layers: int = 1
    top_k: int = 8  # K of the graph job (logged with the run; the model reads graphs as given)
    # Click Perceptron: g = 2 sigmoid(MLP(h_ctr)); cp_hidden = [] is one Linear(32 -> dim x_cvr) [I].
    cp_hidden: list[int] = field(default_factory=list)
    cp_detach: bool = False  # [I] no stop-gradient on h_ctr (as AITM)
    # Curse Escaper (Eq. 18 reconstruction; see cvr_spark.losses.curse_escaper_weights).
    ce_form: str = "power"
    ce_gamma: float = 3.0
    ce_cap: float = 4.0
    ce_buffer_size: int = 10_000
    ce_high_quantile: float = 0.99
    ce_low_quantile: float = 0.10
    ce_include_current: bool = False  # [I] thresholds from the buffer only (current batch excluded)

    def __post_init__(self) -> None:
        check_tower_config(self)
        checks = [
            (self.sm_mode in ("A", "B"), f"sm_mode: expected 'A' or 'B', got {self.sm_mode!r}"),
            (0.0 <= self.sm_alpha <= 1.0, f"sm_alpha: expected 0 <= alpha <= 1, got {self.sm_alpha}"),
            (1 <= self.sm_layers <= (3 if self.sm_mode == "A" else 100),
             f"sm_layers: expected 1..3 for sm_mode A (K^L lookups per row), >= 1 for B; got {self.sm_layers}"),
            (self.top_k >= 1, f"top_k: expected >= 1, got {self.top_k}"),
            (self.ce_form in losses.CE_FORMS,
             f"ce_form: expected one of {losses.CE_FORMS}, got {self.ce_form!r}"),
            (self.ce_gamma > 0 and self.ce_cap >= 1,
             f"ce_gamma > 0 and ce_cap >= 1 expected, got {self.ce_gamma}, {self.ce_cap}"),
            (self.ce_buffer_size >= 1, f"ce_buffer_size: expected >= 1, got {self.ce_buffer_size}"),
            (0.0 <= self.ce_low_quantile <= self.ce_high_quantile <= 1.0,
             f"ce_low_quantile <= ce_high_quantile in [0, 1] expected, "
             f"got {self.ce_low_quantile}, {self.ce_high_quantile}"),
            (min(self.ctr_weight, self.cvr_weight, self.calibrator_weight) >= 0, "loss weights: expected >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


class PredictionFIFO(nn.Module):
    """FIFO of the last ``capacity`` detached values, as registered buffers (checkpointed).

    A ring buffer: ``values[:count]`` holds the live entries (order irrelevant for quantiles);
    a push overwrites the oldest. Updated in place under ``no_grad`` (DDP keeps its buffer
    references; the buffer never enters an autograd graph).
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.register_buffer("values", torch.zeros(capacity))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("pos", torch.zeros((), dtype=torch.long))

    def snapshot(self) -> Tensor:
        """The live entries [count] (a view; do not modify)."""
        return self.values[: int(self.count)]

    @torch.no_grad()
    def push(self, x: Tensor) -> None:
        """Append ``x`` (flattened, detached), evicting the oldest entries beyond capacity."""
        x = x.detach().flatten().to(self.values)
        n = x.numel()
        if n == 0:
            return
        if n >= self.capacity:
            self.values.copy_(x[-self.capacity:])
            self.pos.zero_()
            self.count.fill_(self.capacity)
            return
        slots = (self.pos + torch.arange(n, device=x.device)) % self.capacity  # [n]
        self.values[slots] = x
        self.pos.copy_((self.pos + n) % self.capacity)
        self.count.add_(n).clamp_(max=self.capacity)


@register("cstwa")
class CSTWA(CVRModel):
    """CSTWA: click tower on E^ctr; conversion tower on the migrated, click-gated E^cvr input.

    - **Embeddings**: two independent tables, E^ctr (x_ctr) and E^cvr (x_cvr), same layout.
    - **Structure Migrator** (``structure_migrator``): the single-valued user fields
      (``graph_fields(spec, 'user')``) of x_cvr become ũ = (1-α) u + α (Â^L U)_u, items likewise.
      Option A (``sm_mode='A'``): per batch in the autograd graph, U = the E^cvr embeddings of
      each node's ``node_fields``; u (the self term) is the batch row's own E^cvr lookups, and
      rows whose key index is >= N keep ũ = u. Option B: trainable per-node tables R_u, R_i
      (rows = the key field's vocabulary; graph nodes initialised from E^cvr by Eq. 8 when the
      graphs are first set), R <- (1-α) R + α Â^L R after every epoch (:meth:`on_epoch_end`);
      rows >= N use plain E^cvr lookups. Requires :meth:`set_graphs` first.
    - **Click Perceptron** (``click_perceptron``): x̃_cvr = g ⊙ x_cvr, g = 2σ(MLP(h_ctr)) of
      width dim(x_cvr) (dense features included). Off: no info layer at all (g ≡ 1).
    - **Curse Escaper** (``curse_escaper``): detached weights w on the purchase BCE, thresholds
      (θ_h, θ_l) = quantiles of a FIFO of the last ``ce_buffer_size`` training CTR predictions,
      taken before the batch; the first batch (empty FIFO) uses its own predictions. The FIFO is
      filled in :meth:`on_train_batch_end` (so validation / evaluation never enters it); a loop
      that does not call the hook gets per-batch thresholds. Under DDP the FIFO is a module
      buffer and so follows rank 0's (``broadcast_buffers``). Off: w ≡ 1.

    **Outputs.** ŷ_cvr is trained on D against the buy label and constrained ≤ ŷ_ctr, so it is
    an impression-level P(click & buy): it is ``p_ctcvr`` (``ctcvr_output``). ``p_cvr`` =
    clamp(p_ctcvr / p_ctr, 0, 1) is the derived post-click score (``cvr_output``); no loss uses it.

    **Loss** (Eq. 20): ``ctr`` mean_D BCE(ŷ_ctr, o) + ``cvr`` mean_D w BCE(ŷ_cvr, o r)
    + 0.6 ``calibrator`` mean_D max(ŷ_cvr - ŷ_ctr, 0).

    Graphs are not part of ``state_dict`` (option B's tables are): call :meth:`set_graphs`
    again after rebuilding the model from a checkpoint (before or after ``load_state_dict``).
    """

    paper = "CSTWA (arXiv 2304.01169, ECML-PKDD 2023); equations reconstructed per MODELS.md §9"
    config_cls = CSTWAConfig
    cvr_output = "p_cvr"
    ctcvr_output = "p_ctcvr"
    outputs: ClassVar[tuple[str, ...]] = ("p_ctr", "p_cvr", "p_ctcvr")

    def __init__(self, spec: FeatureSpec, cfg: CSTWAConfig) -> None:
        super().__init__(spec, cfg)
        self.ctr_embedding = EmbeddingArch(spec, cfg.embedding_dim, cfg.pooling)
        self.cvr_embedding = EmbeddingArch(spec, cfg.embedding_dim, cfg.pooling)
        width, in_dim = int(cfg.tower_dims[-1]), self.cvr_embedding.out_dim
        self.click_tower = MLP(in_dim, cfg.tower_dims, cfg.dropout)
        self.conversion_tower = MLP(in_dim, cfg.tower_dims, cfg.dropout)
        self.click_head, self.conversion_head = head(width), head(width)
        self.info = MLP(width, cfg.cp_hidden, 0.0, out_dim=in_dim) if cfg.click_perceptron else None
        self.ctr_history = PredictionFIFO(cfg.ce_buffer_size)
        self._graphs: dict[str, NeighbourTable] = {}
        self._cols: dict[str, Tensor] = {}
        self._key_col: dict[str, int] = {}
        self.node_tables = nn.ParameterDict()
        if cfg.structure_migrator:
            self._init_migrator(spec)

    # ----------------------------------------------------------------- Structure Migrator
    def _init_migrator(self, spec: FeatureSpec) -> None:
        """Resolve each group's graph fields and key column; option B: create the node tables."""
        for group in GROUPS:
            key = spec.user_key_field if group == "user" else spec.item_key_field
            fields = graph_fields(spec, group)
            if key not in fields:
                raise ValueError(f"structure_migrator: {group} key field '{key}' must be a single-valued "
                                 f"'{group}' field of the spec (graph fields: {fields}); or set structure_migrator=false")
            self._cols[group] = torch.tensor([spec.all_fields.index(f) for f in fields], dtype=torch.long)
            self._key_col[group] = spec.sparse_fields.index(key)
            if self.cfg.sm_mode == "B":
                vocab = spec.sparse_vocab[self._key_col[group]]
                table = nn.Parameter(torch.empty(vocab, len(fields) * self.cfg.embedding_dim))
                nn.init.normal_(table, std=0.01)
                self.node_tables[group] = table
        if self.cfg.sm_mode == "B":
            self.register_buffer("node_tables_ready", torch.zeros((), dtype=torch.bool))

    def set_graphs(self, user: StructureGraph, item: StructureGraph) -> None:
        """Install the user and item graphs (moved to the model's device).

        Option B: the first call (per ``node_tables_ready``) initialises the graph nodes' rows of
        R_u / R_i from E^cvr (Eq. 8); later calls and checkpoint loads keep the trained tables.

        Raises:
            ValueError: SM is off, or a graph does not fit the spec (names graph and field).
        """
        if not self.cfg.structure_migrator:
            raise ValueError("set_graphs: structure_migrator is off; the model has no use for graphs")
        device = self.ctr_embedding.table.weight.device
        for group, graph in zip(GROUPS, (user, item)):
            self._check_graph(group, graph)
            self._graphs[group] = NeighbourTable(graph).to(device)
        if self.cfg.sm_mode == "B" and not bool(self.node_tables_ready):
            with torch.no_grad():
                for group in GROUPS:
                    table = self._graphs[group]
                    init = self._embed_nodes(group, table.node_fields)  # [N, M, D]
                    self.node_tables[group][: table.num_nodes] = init.flatten(1)
            self.node_tables_ready.fill_(True)

    def _check_graph(self, group: str, graph: StructureGraph) -> None:
        fields = graph_fields(self.spec, group)
        key_vocab = self.spec.sparse_vocab[self._key_col[group]]
        if graph.num_nodes > key_vocab:
            key = self.spec.sparse_fields[self._key_col[group]]
            raise ValueError(f"set_graphs: {group} graph has {graph.num_nodes} nodes but its key field "
                             f"'{key}' has only {key_vocab} vocabulary indices")
        if graph.node_fields.shape[1] != len(fields):
            raise ValueError(f"set_graphs: {group} graph node_fields has {graph.node_fields.shape[1]} columns; "
                             f"expected {len(fields)} for fields {fields}")
        for j, name in enumerate(fields):
            vocab = self.spec.sparse_vocab[self.spec.sparse_fields.index(name)]
            col = graph.node_fields[:, j]
            if col.numel() and (int(col.min()) < 0 or int(col.max()) >= vocab):
                raise ValueError(f"set_graphs: {group} graph node_fields column {j} (field '{name}') has "
                                 f"indices outside [0, {vocab})")

    def _table(self, group: str, device: torch.device) -> NeighbourTable:
        if group not in self._graphs:
            raise RuntimeError("CSTWA: structure_migrator is on but no graphs are set; call "
                               "model.set_graphs(user=StructureGraph(...), item=StructureGraph(...)) "
                               "before forward, or set structure_migrator=false")
        return self._graphs[group].to(device)

    def _embed_nodes(self, group: str, node_fields: Tensor) -> Tensor:
        """E^cvr embeddings of nodes' field values [..., M] -> [..., M, D]."""
        cols = self._cols[group].to(node_fields.device)
        return self.cvr_embedding.lookup(node_fields, self.cvr_embedding.offsets[cols])

    def _migrate(self, group: str, batch: Batch, u: Tensor) -> Tensor:
        """ũ for the batch rows: u [B, M, D] are the rows' own E^cvr lookups of the group's fields."""
        table = self._table(group, u.device)
        nodes = batch["sparse"][:, self._key_col[group]].long()  # [B]
        in_graph = nodes < table.num_nodes  # [B]
        safe = torch.where(in_graph, nodes, torch.zeros_like(nodes))
        if self.cfg.sm_mode == "B":
            moved = gather_rows(self.node_tables[group], safe).view_as(u)  # [B, M, D]
        else:
            idx, weight = table.paths(safe, self.cfg.sm_layers)  # [B, P] each
            neighbours = self._embed_nodes(group, gather_rows(table.node_fields, idx))  # [B, P, M, D]
            # Σ_p weight[b, p] neighbours[b, p]: a broadcast product and a sum over P, not a bmm
            # of B [1, P] x [P, M*D] products (on CPU 3-4x slower, its backward above all)
            spread = (weight.to(u.dtype).unsqueeze(-1) * neighbours.flatten(2)).sum(1).view_as(u)  # [B, M, D]
            moved = (1.0 - self.cfg.sm_alpha) * u + self.cfg.sm_alpha * spread
        return torch.where(in_graph.view(-1, 1, 1), moved, u)

    def cvr_input(self, batch: Batch) -> Tensor:
        """x_cvr [B, (F+M)*D + Z]: E^cvr lookups, user/item fields migrated when SM is on."""
        emb = self.cvr_embedding(batch)  # [B, F+M, D]
        if self.cfg.structure_migrator:
            for group in GROUPS:
                cols = self._cols[group].to(emb.device)
                emb = emb.index_copy(1, cols, self._migrate(group, batch, emb[:, cols]))  # [B, F+M, D]
        return self.cvr_embedding.flat(batch, emb)

    # ----------------------------------------------------------------------- forward/loss
    def forward(self, batch: Batch) -> dict[str, Tensor]:
        x_ctr = self.ctr_embedding.flat(batch)  # [B, (F+M)*D + Z]
        h_ctr = self.click_tower(x_ctr)  # [B, H]
        x_cvr = self.cvr_input(batch)  # [B, (F+M)*D + Z]
        if self.info is not None:
            gate_in = h_ctr.detach() if self.cfg.cp_detach else h_ctr
            x_cvr = x_cvr * (2.0 * torch.sigmoid(self.info(gate_in)))  # g in (0, 2)
        h_cvr = self.conversion_tower(x_cvr)  # [B, H]
        p_ctr = torch.sigmoid(self.click_head(h_ctr)).squeeze(-1)  # [B]
        p_ctcvr = torch.sigmoid(self.conversion_head(h_cvr)).squeeze(-1)  # [B]
        p_cvr = (p_ctcvr / p_ctr.clamp_min(losses.EPS)).clamp(0.0, 1.0)
        return {"p_ctr": p_ctr, "p_cvr": p_cvr, "p_ctcvr": p_ctcvr}

    def curse_escaper_thresholds(self, p_ctr: Tensor) -> tuple[Tensor, Tensor]:
        """(θ_h, θ_l) for a batch with CTR predictions ``p_ctr``: from the FIFO (plus the batch
        when ``ce_include_current``), or from the batch alone while the FIFO is empty."""
        history = self.ctr_history.snapshot()
        current = p_ctr.detach().to(history)
        if history.numel() == 0:
            history = current
        elif self.cfg.ce_include_current:
            history = torch.cat([history, current])
        return losses.curse_escaper_thresholds(history, self.cfg.ce_high_quantile, self.cfg.ce_low_quantile)

    def curse_escaper_weights(self, batch: Batch, out: Mapping[str, Tensor]) -> Tensor:
        """Detached w [B] of the purchase loss (all ones when CE is off or the batch is empty)."""
        p_ctr = out["p_ctr"]
        if not self.cfg.curse_escaper or p_ctr.numel() == 0:
            return torch.ones_like(p_ctr).detach()
        theta_high, theta_low = self.curse_escaper_thresholds(p_ctr)
        purchase = losses.ctcvr_label(batch["click"], batch["conversion"]).to(p_ctr.dtype)
        cfg: CSTWAConfig = self.cfg
        return losses.curse_escaper_weights(p_ctr, purchase, theta_high, theta_low,
                                                  cfg.ce_gamma, cfg.ce_cap, cfg.ce_form)

    def loss(self, batch: Batch, out: Mapping[str, Tensor]) -> dict[str, Tensor]:
        cfg: CSTWAConfig = self.cfg
        click, conversion = batch["click"].to(out["p_ctr"].dtype), batch["conversion"].to(out["p_ctr"].dtype)
        ctr = losses.ctr_loss_exposure(out["p_ctr"], click)
        weights = self.curse_escaper_weights(batch, out)
        cvr = losses.curse_escaper_loss_exposure(out["p_ctcvr"], click, conversion, weights)
        calibrator = losses.calibrator_loss_exposure(out["p_ctr"], out["p_ctcvr"])
        total = losses.cstwa_total(ctr, cvr, calibrator, (cfg.ctr_weight, cfg.cvr_weight, cfg.calibrator_weight))
        return {"ctr": ctr, "cvr": cvr, "calibrator": calibrator, "total": total}

    # ------------------------------------------------------------------------------ hooks
    def on_train_batch_end(self, batch: Batch, out: Mapping[str, Tensor]) -> None:
        """Push the batch's detached training CTR predictions into the Curse Escaper FIFO."""
        if self.cfg.curse_escaper:
            self.ctr_history.push(out["p_ctr"])

    @torch.no_grad()
    def on_epoch_end(self, epoch: int) -> None:
        """Option B: R <- (1-α) R + α Â^L R on the graph nodes' rows of R_u and R_i."""
        if not (self.cfg.structure_migrator and self.cfg.sm_mode == "B"):
            return
        alpha = self.cfg.sm_alpha
        for group in GROUPS:
            param = self.node_tables[group]
            table = self._table(group, param.device)
            rows = param[: table.num_nodes]  # [N, M*D]
            rows.copy_((1.0 - alpha) * rows + alpha * table.propagate(rows.clone(), self.cfg.sm_layers))
