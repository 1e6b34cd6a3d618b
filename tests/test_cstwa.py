"""CSTWA: graphs, Structure Migrator (A/B), Click Perceptron, Curse Escaper, losses, ablations."""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from cvr_spark import losses as losses_cstwa
from cvr_spark.models import registry
from cvr_spark.models.base import FeatureSpec
from cvr_spark.models.cstwa import CSTWA
from cvr_spark.models.cstwa_graph import StructureGraph, gather_rows, graph_fields, normalize_adjacency
from tests.model_testing import bfloat16_loss, params_outside_graph

N_USERS, N_ITEMS, CLUSTERS = 21, 17, 4  # graph nodes 0..N-1 (0 = OOV, self-only); vocab is larger
SPEC = FeatureSpec(
    sparse_fields=("101", "121", "205", "206", "301"),
    sparse_vocab=(25, CLUSTERS + 1, 20, CLUSTERS + 1, 4),
    multi_fields=("109_14",),
    multi_vocab=(7,),
    dense_fields=("D1",),
    groups={"101": "user", "121": "user", "109_14": "user", "205": "item", "206": "item", "301": "context"},
)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a loaded 2-core machine two threads make these tiny ops ~15x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cluster(ids: np.ndarray) -> np.ndarray:
    """Profile value (121 / 206) of a user / item id; id 0 (OOV) has profile 0."""
    return np.where(ids == 0, 0, ids % CLUSTERS + 1)


def knn_graph(n: int, k: int, seed: int) -> StructureGraph:
    """Cosine top-k (self included) of noisy cluster one-hots, negatives dropped, normalised;
    node 0 has no row (self-only)."""
    rng = np.random.default_rng(seed)
    ids = np.arange(n)
    rep = np.eye(CLUSTERS + 1)[cluster(ids)] + rng.normal(0, 0.3, (n, CLUSTERS + 1))
    rep /= np.linalg.norm(rep, axis=1, keepdims=True)
    sim = np.maximum(rep @ rep.T, 0.0)  # [N, N]
    rows, cols, vals = [], [], []
    for i in range(1, n):
        top = np.argsort(-sim[i])[:k]
        rows += [i] * k
        cols += list(top)
        vals += list(sim[i, top])
    adj = normalize_adjacency(torch.tensor([rows, cols]), torch.tensor(vals, dtype=torch.float32), n)
    return StructureGraph(adj, torch.from_numpy(np.stack([ids, cluster(ids)], 1)))


def make_batch(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Clicks driven by user-cluster x item-cluster affinity, conversions by user id (on clicks)."""
    rng = np.random.default_rng(seed)
    user, item = rng.integers(1, 25, n), rng.integers(1, 20, n)
    affinity = np.random.default_rng(7).normal(0, 1.5, (CLUSTERS + 1, CLUSTERS + 1))
    user_effect = np.random.default_rng(8).normal(0, 1.5, 25)
    p_click = 1 / (1 + np.exp(-(affinity[cluster(user), cluster(item)] - 0.8)))
    click = (rng.random(n) < p_click).astype(np.float32)
    conversion = click * (rng.random(n) < 1 / (1 + np.exp(-(user_effect[user] - 0.5))))
    sparse = np.stack([user, cluster(user), item, cluster(item), rng.integers(0, 4, n)], 1)
    return {
        "sparse": torch.from_numpy(sparse).long(),
        "multi": torch.from_numpy(rng.integers(0, 7, (n, 1, 3))).long(),
        "multi_len": torch.from_numpy(rng.integers(1, 4, (n, 1))).long(),
        "dense": torch.from_numpy(rng.normal(size=(n, 1)).astype(np.float32)),
        "click": torch.from_numpy(click),
        "conversion": torch.from_numpy(conversion.astype(np.float32)),
    }


def make_model(graphs: bool = True, seed: int = 0, **overrides) -> CSTWA:
    torch.manual_seed(seed)
    model = registry.build("cstwa", SPEC, registry.preset_options("cstwa", "fast", overrides))
    if graphs and model.cfg.structure_migrator:
        model.set_graphs(knn_graph(N_USERS, 3, seed=1), knn_graph(N_ITEMS, 3, seed=2))
    return model


def zero_grad_params(model: CSTWA, batch: dict) -> list[str]:
    model.train()
    model.zero_grad(set_to_none=True)
    model.loss(batch, model(batch))["total"].backward()
    return [n for n, p in model.named_parameters() if p.grad is None or not bool((p.grad != 0).any())]


# ------------------------------------------------------------------------------- graphs
def test_normalize_adjacency_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    n = 7
    rows = np.array([0, 0, 1, 1, 2, 3, 3, 3, 5, 5, 0])  # node 4 and 6: no row; (0, 1) twice
    cols = np.array([0, 1, 2, 0, 2, 3, 5, 6, 5, 1, 1])
    vals = rng.random(rows.size).astype(np.float32)
    dense = np.zeros((n, n))
    np.add.at(dense, (rows, cols), vals)
    deg = dense.sum(1)
    inv = np.array([d ** -0.5 if d > 0 else 0.0 for d in deg])
    expected = inv[:, None] * dense * inv[None, :]
    adj = normalize_adjacency(torch.tensor(np.stack([rows, cols])), torch.from_numpy(vals), n)
    assert adj.is_sparse and adj.shape == (n, n)
    np.testing.assert_allclose(adj.to_dense().numpy(), expected, rtol=1e-5, atol=1e-7)


def test_normalize_adjacency_rejects_bad_input() -> None:
    idx = torch.tensor([[0, 1], [1, 0]])
    with pytest.raises(ValueError, match=">= 0"):
        normalize_adjacency(idx, torch.tensor([0.5, -0.1]), 2)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        normalize_adjacency(torch.tensor([[0, 2], [1, 0]]), torch.tensor([0.5, 0.1]), 2)


def test_set_graphs_validates_against_the_spec() -> None:
    model = make_model(graphs=False)
    good_user, good_item = knn_graph(N_USERS, 3, 1), knn_graph(N_ITEMS, 3, 2)
    assert graph_fields(SPEC, "user") == ["101", "121"]  # multi-valued 109_14 excluded
    bad_cols = StructureGraph(good_user.adj, good_user.node_fields[:, :1])
    with pytest.raises(ValueError, match="expected 2 for fields"):
        model.set_graphs(bad_cols, good_item)
    too_big = knn_graph(30, 3, 1)  # 30 nodes > vocabulary 25 of field 101
    with pytest.raises(ValueError, match="'101' has only 25"):
        model.set_graphs(too_big, good_item)
    fields = good_item.node_fields.clone()
    fields[3, 1] = CLUSTERS + 1  # one past the vocabulary of 206
    out_of_range = StructureGraph(good_item.adj, fields)
    with pytest.raises(ValueError, match="field '206'"):
        model.set_graphs(good_user, out_of_range)


def test_migrator_on_without_graphs_raises() -> None:
    model = make_model(graphs=False)
    with pytest.raises(RuntimeError, match="set_graphs"):
        model(make_batch(8))


# -------------------------------------------------------------------------- interface
@pytest.mark.parametrize("overrides", [{}, {"sm_mode": "B"}, {"sm_layers": 2},
                                       {"structure_migrator": False, "click_perceptron": False, "curse_escaper": False}])
def test_outputs_shapes_and_ranges(overrides: dict) -> None:
    model = make_model(**overrides).eval()
    out = model(make_batch(64, seed=1))
    assert set(out) == set(CSTWA.outputs) and CSTWA.ctcvr_output == "p_ctcvr" and CSTWA.cvr_output == "p_cvr"
    for key, value in out.items():
        assert value.shape == (64,) and torch.isfinite(value).all(), key
        assert (value >= 0).all() and (value <= 1).all(), key
    torch.testing.assert_close(out["p_cvr"], (out["p_ctcvr"] / out["p_ctr"]).clamp(0, 1))


def test_paper_preset() -> None:
    opts = registry.preset_options("cstwa", "paper")
    expected = dict(embedding_dim=5, tower_dims=[128, 64, 32], dropout=[0.1, 0.3, 0.3], lr=1e-3, batch_size=2000,
                    weight_decay=1e-6, top_k=8, sm_layers=1, sm_alpha=0.3, ce_gamma=3.0, ctr_weight=1.0,
                    cvr_weight=1.0, calibrator_weight=0.6, ce_cap=4.0, ce_buffer_size=10_000)
    assert {k: opts[k] for k in expected} == expected
    model = registry.build("cstwa", SPEC, opts)
    assert model.info.out_dim == model.cvr_embedding.out_dim == 6 * 5 + 1
    with pytest.raises(ValueError, match="sm_mode"):
        registry.build("cstwa", SPEC, {"sm_mode": "C"})


@pytest.mark.parametrize("overrides", [{}, {"sm_mode": "B"}, {"click_perceptron": False}, {"sm_layers": 2}])
def test_gradients_reach_every_parameter(overrides: dict) -> None:
    model = make_model(**overrides)
    assert zero_grad_params(model, make_batch(128, seed=2)) == []
    assert (model.info is None) == (overrides.get("click_perceptron") is False)


@pytest.mark.parametrize("overrides", [{}, {"sm_mode": "B"}])
def test_trains_under_bfloat16_autocast_with_graphs(overrides: dict) -> None:
    """train.amp=true on CPU: the structure migrator's graph lookups under bfloat16 autocast."""
    model = make_model(**overrides)
    model.train()
    terms = bfloat16_loss(model, make_batch(128, seed=2))
    assert all(bool(torch.isfinite(v)) for v in terms.values())
    terms["total"].backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)


def test_option_a_matches_formula_and_reaches_ecvr_through_both_terms() -> None:
    model = make_model(sm_alpha=0.3)
    batch = make_batch(1, seed=3)
    batch["sparse"][0, :2] = torch.tensor([5, 3])  # user 5 with profile 3 (its node profile is 2)
    graph = model._graphs["user"]
    adj = graph.adj.to_dense()
    emb = model.cvr_embedding.table.weight
    offs = model.cvr_embedding.offsets[:2]
    node_u = emb[graph.node_fields + offs]  # [N, 2, D]: U^cvr by Eq. 8
    own = emb[batch["sparse"][0, :2] + offs]  # [2, D]: the row's own lookups
    expected = 0.7 * own + 0.3 * torch.einsum("j,jmd->md", adj[5], node_u)
    x = model.cvr_input(batch).view(1, -1)
    torch.testing.assert_close(x[0, :2 * 4], expected.flatten())
    neighbours = adj[5].nonzero().flatten().tolist()
    assert 3 not in graph.node_fields[neighbours, 1].tolist()  # profile 3 reaches x only via the self term
    neighbour = [j for j in neighbours if j != 5][0]
    model.zero_grad(set_to_none=True)
    x[0, :8].sum().backward()
    grad = emb.grad
    assert grad[offs[1] + 3].abs().sum() > 0  # self term: the row's own profile 3 (not in any node row)
    assert grad[offs[0] + neighbour].abs().sum() > 0  # propagation term: a neighbour's id row


def test_gather_rows_is_advanced_indexing() -> None:
    """The graph gathers' ``index_select`` helper gives ``table[index]`` for any index shape."""
    g = torch.Generator().manual_seed(0)
    for table in (torch.randn(50, generator=g), torch.randn(50, 3, generator=g), torch.randint(0, 9, (50, 4, 2), generator=g)):
        for shape in ((7,), (4, 8), (2, 3, 5), (0,)):
            index = torch.randint(0, 50, shape, generator=g)
            got = gather_rows(table, index)
            assert got.shape == table[index].shape and torch.equal(got, table[index])


def test_option_a_two_layers_and_missing_nodes() -> None:
    model = make_model(sm_layers=2, sm_alpha=0.5)
    batch = make_batch(3, seed=4)
    batch["sparse"][:, 0] = torch.tensor([6, 23, 0])  # in graph; beyond N (missing); OOV (self-only row)
    graph = model._graphs["user"]
    adj = graph.adj.to_dense()
    emb, offs = model.cvr_embedding.table.weight, model.cvr_embedding.offsets[:2]
    node_u = emb[graph.node_fields + offs]  # [N, 2, D]
    own = emb[batch["sparse"][:, :2] + offs]  # [3, 2, D]
    two_hop = torch.einsum("j,jmd->md", (adj @ adj)[6], node_u)
    x = model.cvr_input(batch)[:, :8].view(3, 2, 4)
    torch.testing.assert_close(x[0], 0.5 * own[0] + 0.5 * two_hop)
    torch.testing.assert_close(x[1], own[1])
    torch.testing.assert_close(x[2], 0.5 * own[2] + 0.5 * node_u[0])


def test_one_step_lowers_the_loss() -> None:
    model = make_model()
    batch = make_batch(256, seed=5)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.eval()  # fixed thresholds and no dropout: the same deterministic loss before and after
    before = model.loss(batch, model(batch))["total"]
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = model.loss(batch, model(batch))["total"]
    assert after < before


# ------------------------------------------------------------------------------ losses
def bce(p: float, y: float) -> float:
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def test_loss_terms_equal_hand_computation() -> None:
    model = make_model(ce_buffer_size=10_000)
    history = np.linspace(0.0, 1.0, 101).astype(np.float32)
    model.ctr_history.push(torch.from_numpy(history))
    th_high, th_low = np.quantile(history.astype(np.float64), [0.99, 0.10])
    p_ctr = [0.995, 0.05, 0.08, 0.5, 0.999, 0.02]
    p_buy = [0.3, 0.04, 0.07, 0.6, 0.2, 0.05]
    click = [1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    conv = [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    w = [(0.995 / th_high) ** 3, 4.0, (th_low / 0.08) ** 3, 1.0, 1.0, 1.0]  # FP; FN capped; FN; rest 1
    assert 1.0 < w[0] < 1.1 and 1.9 < w[2] < 2.0
    batch = {"click": torch.tensor(click), "conversion": torch.tensor(conv)}
    out = {"p_ctr": torch.tensor(p_ctr), "p_ctcvr": torch.tensor(p_buy)}
    got = model.loss(batch, out)
    n = len(p_ctr)
    ctr = sum(bce(p, y) for p, y in zip(p_ctr, click)) / n
    cvr = sum(wi * bce(p, c * r) for wi, p, c, r in zip(w, p_buy, click, conv)) / n
    cal = sum(max(b - c, 0.0) for b, c in zip(p_buy, p_ctr)) / n
    assert got["ctr"].item() == pytest.approx(ctr, rel=1e-5)
    assert got["cvr"].item() == pytest.approx(cvr, rel=1e-5)
    assert got["calibrator"].item() == pytest.approx(cal, rel=1e-5)
    assert got["total"].item() == pytest.approx(ctr + cvr + 0.6 * cal, rel=1e-5)
    np.testing.assert_allclose(model.curse_escaper_weights(batch, out).numpy(), w, rtol=1e-5)


def test_curse_escaper_weights_formula_cap_and_detached() -> None:
    p = torch.tensor([0.9, 0.05, 0.5, 0.2, 0.7, 0.01], requires_grad=True)
    y = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    w = losses_cstwa.curse_escaper_weights(p, y, 0.6, 0.1, gamma=3.0, cap=4.0)
    assert not w.requires_grad
    np.testing.assert_allclose(w.numpy(), [1.5 ** 3, 4.0, 1.0, 1.0, 1.0, 1.0], rtol=1e-6)  # 2^3 = 8 -> cap 4
    const = losses_cstwa.curse_escaper_weights(p, y, 0.6, 0.1, gamma=3.0, cap=4.0, form="constant")
    np.testing.assert_allclose(const.numpy(), [3.0, 3.0, 1.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="form"):
        losses_cstwa.curse_escaper_weights(p, y, 0.6, 0.1, form="linear")


def test_threshold_buffer_first_batch_and_fifo_eviction() -> None:
    model = make_model(ce_buffer_size=10_000)
    first = torch.rand(2000, generator=torch.Generator().manual_seed(0))
    th = model.curse_escaper_thresholds(first)  # empty FIFO: the batch's own predictions
    np.testing.assert_allclose([t.item() for t in th], np.quantile(first.double().numpy(), [0.99, 0.10]), rtol=1e-5)
    model.on_train_batch_end({}, {"p_ctr": first})
    second = torch.full((2000,), 0.5)
    th = model.curse_escaper_thresholds(second)  # from the FIFO only: the current batch is excluded
    np.testing.assert_allclose([t.item() for t in th], np.quantile(first.double().numpy(), [0.99, 0.10]), rtol=1e-5)
    model.ctr_history.push(torch.empty(0))
    for k in range(1, 6):  # 12,000 values in all: the first 2,000 (the random batch) are evicted
        model.on_train_batch_end({}, {"p_ctr": torch.arange(2000 * k, 2000 * (k + 1), dtype=torch.float32)})
    live = np.sort(model.ctr_history.snapshot().numpy())
    np.testing.assert_array_equal(live, np.arange(2000, 12000))
    model.ctr_history.push(torch.tensor([-1.0, -2.0, -3.0]))  # evicts the 3 oldest: 2000, 2001, 2002
    live = np.sort(model.ctr_history.snapshot().numpy())
    np.testing.assert_array_equal(live, np.sort(np.r_[np.arange(2003, 12000), [-1, -2, -3]]))
    model.ctr_history.push(torch.arange(12_000, dtype=torch.float32))  # more than capacity: the last 10,000
    np.testing.assert_array_equal(np.sort(model.ctr_history.snapshot().numpy()), np.arange(2000, 12000))


def test_threshold_buffer_options_and_checkpoint() -> None:
    model = make_model(ce_buffer_size=100, ce_include_current=True)
    model.on_train_batch_end({}, {"p_ctr": torch.linspace(0, 1, 50)})
    current = torch.linspace(0.2, 0.4, 10)
    expected = np.quantile(np.r_[np.linspace(0, 1, 50), np.linspace(0.2, 0.4, 10)], [0.99, 0.10])
    np.testing.assert_allclose([t.item() for t in model.curse_escaper_thresholds(current)], expected, rtol=1e-5)
    state = model.state_dict()
    assert {"ctr_history.values", "ctr_history.count", "ctr_history.pos"} <= set(state)
    restored = make_model(seed=1, ce_buffer_size=100, ce_include_current=True)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.curse_escaper_thresholds(current), model.curse_escaper_thresholds(current))
    off = make_model(curse_escaper=False)
    off.on_train_batch_end({}, {"p_ctr": torch.rand(10)})
    assert int(off.ctr_history.count) == 0


def test_empty_click_space_gives_finite_loss() -> None:
    model = make_model()
    batch = make_batch(32, seed=6)
    batch["click"].zero_()
    batch["conversion"].zero_()
    terms = model.loss(batch, model(batch))
    assert all(torch.isfinite(v) for v in terms.values())
    terms["total"].backward()
    assert params_outside_graph(model) == []  # in the graph even without clicks (DDP)


# --------------------------------------------------------------------------- ablations
def test_click_perceptron_off_is_g_equal_one() -> None:
    on, off = make_model(), make_model(click_perceptron=False)
    assert off.info is None and not any(n.startswith("info.") for n, _ in off.named_parameters())
    with torch.no_grad():
        for p in on.info.parameters():
            p.zero_()  # g = 2 sigmoid(0) = 1
    off.load_state_dict({k: v for k, v in on.state_dict().items() if not k.startswith("info.")})
    batch = make_batch(32, seed=7)
    on.eval(), off.eval()
    for key, value in on(batch).items():
        torch.testing.assert_close(off(batch)[key], value)


def test_structure_migrator_off_ignores_graphs() -> None:
    off = make_model(structure_migrator=False)
    with pytest.raises(ValueError, match="structure_migrator is off"):
        off.set_graphs(knn_graph(N_USERS, 3, 1), knn_graph(N_ITEMS, 3, 2))
    zero_alpha = make_model(sm_alpha=0.0)  # ũ = u: must equal plain lookups
    zero_alpha.load_state_dict(off.state_dict())
    batch = make_batch(32, seed=8)
    off.eval(), zero_alpha.eval()
    torch.testing.assert_close(zero_alpha(batch)["p_ctcvr"], off(batch)["p_ctcvr"])
    on = make_model().eval()
    before = on(batch)["p_ctcvr"]
    on.set_graphs(knn_graph(N_USERS, 5, 11), knn_graph(N_ITEMS, 5, 12))
    assert not torch.allclose(on(batch)["p_ctcvr"], before)  # with SM on the graph matters


def test_curse_escaper_off_is_w_equal_one() -> None:
    on, off = make_model(), make_model(curse_escaper=False)
    batch = make_batch(64, seed=9)
    batch["click"], batch["conversion"] = torch.ones(64), (torch.arange(64) % 2 == 0).float()
    out = {"p_ctr": torch.linspace(0.01, 0.99, 64), "p_ctcvr": torch.full((64,), 0.005)}
    assert torch.equal(off.curse_escaper_weights(batch, out), torch.ones(64))
    assert (on.curse_escaper_weights(batch, out) > 1).any()
    plain = losses_cstwa.curse_escaper_loss_exposure(out["p_ctcvr"], batch["click"], batch["conversion"], torch.ones(64))
    torch.testing.assert_close(off.loss(batch, out)["cvr"], plain)
    assert on.loss(batch, out)["cvr"] > plain
    torch.testing.assert_close(on.loss(batch, out)["ctr"], off.loss(batch, out)["ctr"])
    on.eval(), off.eval()
    torch.testing.assert_close(on(batch)["p_ctcvr"], off(batch)["p_ctcvr"])  # same init, same forward


# ----------------------------------------------------------------------------- option B
def test_option_b_init_and_epoch_update_match_the_formula() -> None:
    model = make_model(sm_mode="B", sm_alpha=0.3, sm_layers=2)
    graph = model._graphs["user"]
    emb, offs = model.cvr_embedding.table.weight, model.cvr_embedding.offsets[:2]
    table = model.node_tables["user"]
    torch.testing.assert_close(table[:N_USERS].detach(), emb[graph.node_fields + offs].flatten(1).detach())  # Eq. 8
    with torch.no_grad():
        table.add_(torch.randn_like(table))  # as if trained
    r = table.detach().double().numpy().copy()
    adj = graph.adj.to_dense().double().numpy()  # self-only rows filled in (node 0)
    assert adj[0, 0] == 1.0
    expected = r.copy()
    expected[:N_USERS] = 0.7 * r[:N_USERS] + 0.3 * adj @ adj @ r[:N_USERS]
    model.on_epoch_end(0)
    np.testing.assert_allclose(table.detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.set_graphs(knn_graph(N_USERS, 3, 1), knn_graph(N_ITEMS, 3, 2))  # a refresh keeps trained tables
    torch.testing.assert_close(model.node_tables["user"], state["node_tables.user"])


# ---------------------------------------------------------------------- learning, DDP
def test_overfit_reaches_train_auc_above_chance() -> None:
    model = make_model()
    batch = make_batch(512, seed=10)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    model.train()
    for _ in range(120):
        opt.zero_grad()
        out = model(batch)
        model.loss(batch, out)["total"].backward()
        opt.step()
        model.on_train_batch_end(batch, out)
    model.eval()
    with torch.no_grad():
        out = model(batch)
    assert roc_auc_score(batch["click"].numpy(), out["p_ctr"].numpy()) > 0.75
    assert roc_auc_score(batch["conversion"].numpy(), out["p_ctcvr"].numpy()) > 0.75


def _train_steps(model: torch.nn.Module, net: CSTWA, device: torch.device, steps: int = 3) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for step in range(steps):
        batch = {k: v.to(device) for k, v in make_batch(64, seed=step).items()}
        opt.zero_grad()
        out = model(batch)
        total = net.loss(batch, out)["total"]
        assert torch.isfinite(total)
        total.backward()
        opt.step()
        net.on_train_batch_end(batch, out)
    net.on_epoch_end(0)
    assert int(net.ctr_history.count) == 3 * 64


@pytest.mark.parametrize("mode", ["A", "B"])
def test_runs_under_ddp(mode: str, tmp_path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        net = make_model(sm_mode=mode)
        _train_steps(DistributedDataParallel(net), net, torch.device("cpu"))
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["A", "B"])
def test_runs_on_cuda(mode: str) -> None:
    net = make_model(sm_mode=mode, graphs=False).cuda()
    net.set_graphs(knn_graph(N_USERS, 3, 1), knn_graph(N_ITEMS, 3, 2))
    _train_steps(net, net, torch.device("cuda"))
