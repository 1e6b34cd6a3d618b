"""Row-wise (lazy) Adam for embedding tables: the update against a hand-computed reference,
dense Adam / SparseAdam equivalences, untouched rows, weight decay, bias correction by the
global step, padding, dense-gradient fallback, state_dict round trip, every registry model."""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from cvr_spark.models import registry
from cvr_spark.models.base import EmbeddingArch, FeatureSpec, sum_rows
from cvr_spark.train.optim import LazyEmbeddingAdam, make_optimizer
from tests.model_testing import make_batch, make_spec

SPEC = FeatureSpec(sparse_fields=("a", "b"), sparse_vocab=(4, 3))  # table rows: a -> 0..3, b -> 4..6
BETAS, EPS = (0.9, 0.999), 1e-8


def table(seed: int = 0, spec: FeatureSpec = SPEC, dim: int = 2) -> EmbeddingArch:
    torch.manual_seed(seed)
    arch = EmbeddingArch(spec, dim)
    with torch.no_grad():  # O(1) weights, so that weight decay and the steps are visible
        arch.table.weight.normal_()
    return arch


def coef(batch: dict, seed: int) -> torch.Tensor:
    """Fixed per-slot coefficients C [B, F, D]: loss = sum(C * emb), so d loss / d emb = C."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*batch["sparse"].shape, 2, generator=g, dtype=torch.float64).float()


def step_loss(arch: EmbeddingArch, batch: dict, c: torch.Tensor) -> torch.Tensor:
    return (arch(batch) * c).sum()


# step 1 looks rows a=1 (twice), a=2, b=0 (twice: row 4), b=2 (row 6); step 2 only a=0 and b=1;
# step 3 returns to a=1 (bias correction with t=3 after a step without it).
BATCHES = [
    {"sparse": torch.tensor([[1, 0], [1, 0], [2, 2]])},
    {"sparse": torch.tensor([[0, 1]])},
    {"sparse": torch.tensor([[1, 1], [3, 1]])},
]


def reference_lazy_adam(w0: torch.Tensor, lr: float, wd: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hand-written per-row lazy Adam over BATCHES in float64 (loops, no tensor tricks)."""
    w = w0.double().clone()
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    offsets = [0, 4]
    for t, batch in enumerate(BATCHES, start=1):
        c = coef(batch, t).double()
        grads: dict[int, torch.Tensor] = {}
        for i, sample in enumerate(batch["sparse"].tolist()):
            for f, idx in enumerate(sample):
                row = offsets[f] + idx
                grads[row] = grads.get(row, torch.zeros(2, dtype=torch.float64)) + c[i, f]
        for row, g in grads.items():  # only the looked-up rows, duplicates summed
            g = g + wd * w[row]
            m[row] = BETAS[0] * m[row] + (1 - BETAS[0]) * g
            v[row] = BETAS[1] * v[row] + (1 - BETAS[1]) * g * g
            m_hat = m[row] / (1 - BETAS[0] ** t)
            v_hat = v[row] / (1 - BETAS[1] ** t)
            w[row] = w[row] - lr * m_hat / (v_hat.sqrt() + EPS)
    return w, m, v


def run_lazy(arch: EmbeddingArch, lr: float, wd: float, fused: bool | None = None) -> LazyEmbeddingAdam:
    opt = LazyEmbeddingAdam([], [arch], lr=lr, weight_decay=wd, fused=fused)
    for t, batch in enumerate(BATCHES, start=1):
        opt.zero_grad()
        step_loss(arch, batch, coef(batch, t)).backward()
        assert arch.table.weight.grad is None  # the lookups' gradient went to the row sink
        opt.step()
    return opt


@pytest.mark.parametrize("fused", [None, True])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_lazy_adam_matches_hand_computed_rows(wd, fused):
    arch = table()
    w0 = arch.table.weight.detach().clone()
    opt = run_lazy(arch, lr=0.1, wd=wd, fused=fused)
    w_ref, m_ref, v_ref = reference_lazy_adam(w0, lr=0.1, wd=wd)
    state = opt.state[arch.table.weight]
    assert float(state["step"]) == 3  # the global step, also for rows skipped in step 2
    torch.testing.assert_close(arch.table.weight.detach().double(), w_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state["exp_avg"].double(), m_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(state["exp_avg_sq"].double(), v_ref, rtol=1e-5, atol=1e-9)
    # Rows not read in a step keep their weight and their (zero) moments: step 1 alone.
    arch2 = table()
    before = arch2.table.weight.detach().clone()
    opt2 = LazyEmbeddingAdam([], [arch2], lr=0.1, weight_decay=wd)
    opt2.zero_grad()
    step_loss(arch2, BATCHES[0], coef(BATCHES[0], 1)).backward()
    opt2.step()
    untouched = [0, 3, 5]  # a=0, a=3, b=1 are not in step 1
    after = arch2.table.weight.detach()
    assert torch.equal(after[untouched], before[untouched])
    assert not torch.equal(after[[1, 2, 4, 6]], before[[1, 2, 4, 6]])
    assert torch.count_nonzero(opt2.state[arch2.table.weight]["exp_avg"][untouched]) == 0


def test_lazy_differs_from_dense_adam_on_untouched_rows():
    """The semantic difference: dense Adam keeps moving a row on its stale momentum (and decays
    it) in a step that does not read it; lazy Adam leaves it alone."""
    lazy, dense = table(), table()
    run_lazy(lazy, lr=0.1, wd=0.1)
    opt = torch.optim.Adam(dense.parameters(), lr=0.1, weight_decay=0.1)
    for t, batch in enumerate(BATCHES, start=1):
        opt.zero_grad()
        step_loss(dense, batch, coef(batch, t)).backward()
        opt.step()
    assert not torch.allclose(lazy.table.weight, dense.table.weight, atol=1e-4)


def test_every_row_read_every_step_equals_dense_adam():
    full = {"sparse": torch.tensor([[0, 0], [1, 1], [2, 2], [3, 0], [1, 2]])}  # every row, some twice
    lazy, dense = table(1), table(1)
    opt_lazy = LazyEmbeddingAdam([], [lazy], lr=0.05, weight_decay=0.01)
    opt_dense = torch.optim.Adam(dense.parameters(), lr=0.05, weight_decay=0.01)
    for t in range(1, 6):
        c = coef(full, 10 + t)
        for arch, opt in ((lazy, opt_lazy), (dense, opt_dense)):
            opt.zero_grad()
            step_loss(arch, full, c).backward()
            opt.step()
    torch.testing.assert_close(lazy.table.weight, dense.table.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt_lazy.state[lazy.table.weight]["exp_avg_sq"],
                               opt_dense.state[dense.table.weight]["exp_avg_sq"], rtol=1e-5, atol=1e-9)


def test_equals_sparse_adam_without_weight_decay():
    """torch.optim.SparseAdam (no weight decay) updates the same rows with the same moments; its
    eps sits outside the bias correction (sqrt(v) + eps), a difference far below tolerance."""
    arch = table(2)
    ref = nn.Embedding(7, 2, sparse=True)
    with torch.no_grad():
        ref.weight.copy_(arch.table.weight)
    opt_lazy = LazyEmbeddingAdam([], [arch], lr=0.05)
    opt_ref = torch.optim.SparseAdam(ref.parameters(), lr=0.05)
    offsets = torch.tensor([0, 4])
    for t, batch in enumerate(BATCHES * 2, start=1):
        c = coef(batch, 20 + t)
        opt_lazy.zero_grad()
        step_loss(arch, batch, c).backward()
        opt_lazy.step()
        opt_ref.zero_grad()
        (ref(batch["sparse"] + offsets) * c).sum().backward()
        opt_ref.step()
    torch.testing.assert_close(arch.table.weight, ref.weight, rtol=1e-5, atol=1e-6)


def test_padding_of_multi_valued_fields_is_not_a_lookup():
    spec = FeatureSpec(sparse_fields=("a",), sparse_vocab=(3,), multi_fields=("m",), multi_vocab=(5,))
    arch = table(3, spec)
    # sample 0 reads m values [1, 2] and pads with 4; sample 1 reads [1] and pads with 4, 4
    batch = {"sparse": torch.tensor([[0], [1]]), "multi": torch.tensor([[[1, 2, 4]], [[1, 4, 4]]]),
             "multi_len": torch.tensor([[2], [1]])}
    before = arch.table.weight.detach().clone()
    opt = LazyEmbeddingAdam([], [arch], lr=0.1, weight_decay=0.1)
    opt.zero_grad()
    (arch(batch) * torch.randn(2, 2, 2)).sum().backward()
    opt.step()
    pad_row = 3 + 4
    after = arch.table.weight.detach()
    assert torch.equal(after[pad_row], before[pad_row])
    assert not torch.equal(after[3 + 1], before[3 + 1]) and not torch.equal(after[3 + 2], before[3 + 2])


def test_dense_gradient_on_a_table_is_a_dense_adam_step():
    """An L2 term over the whole table (AITM) touches every row: that step is dense Adam."""
    lazy, dense = table(4), table(4)
    opt_lazy = LazyEmbeddingAdam([], [lazy], lr=0.05)
    opt_dense = torch.optim.Adam(dense.parameters(), lr=0.05)
    for t, batch in enumerate(BATCHES, start=1):
        c = coef(batch, 30 + t)
        for arch, opt in ((lazy, opt_lazy), (dense, opt_dense)):
            opt.zero_grad()
            (step_loss(arch, batch, c) + 0.5 * arch.table.weight.pow(2).sum()).backward()
            opt.step()
    torch.testing.assert_close(lazy.table.weight, dense.table.weight, rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_through_weights_only_load():
    def model_and_opt(seed):
        arch = table(seed)
        head = nn.Linear(4, 1)
        model = nn.ModuleDict({"emb": arch, "head": head})
        return model, LazyEmbeddingAdam(head.parameters(), [arch], lr=0.05, weight_decay=0.01)

    def train(model, opt, batches, first):
        for t, batch in enumerate(batches, start=first):
            opt.zero_grad()
            x = model["emb"].flat(batch)
            (model["head"](x).sum() + (x * coef(batch, t).flatten(1)).sum()).backward()
            opt.step()

    ref, ref_opt = model_and_opt(5)
    train(ref, ref_opt, BATCHES + BATCHES, 1)

    first, first_opt = model_and_opt(5)
    train(first, first_opt, BATCHES, 1)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first_opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    table_state = saved["optimizer"]["state"][max(saved["optimizer"]["state"])]  # the table: last group
    assert table_state["exp_avg"].shape == (7, 2) and float(table_state["step"]) == 3
    resumed, resumed_opt = model_and_opt(99)
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["optimizer"])
    train(resumed, resumed_opt, BATCHES, 4)
    for key, value in ref.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_sum_rows_matches_index_add():
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 50, (400,), generator=g)
    grad = torch.randn(400, 3, generator=g)
    for num_rows in (None, 50):
        distinct, sums = sum_rows(rows, grad, num_rows)
        assert torch.equal(distinct, torch.unique(rows)) and distinct.dtype == torch.int64
        expected = torch.zeros(50, 3).index_add_(0, rows, grad)[distinct]
        torch.testing.assert_close(sums, expected, rtol=1e-5, atol=1e-5)


def test_make_optimizer_choices_and_row_gradient_plumbing():
    spec = make_spec(n_sparse=4, vocab=12)
    torch.manual_seed(0)
    model = registry.build("esmm", spec, registry.preset_options("esmm", "fast"))
    batch = make_batch(spec, 64, seed=1)
    opt = make_optimizer(model)
    assert isinstance(opt, LazyEmbeddingAdam)
    model.loss(batch, model(batch))["total"].backward()
    assert model.embedding.table.weight.grad is None and model.embedding.row_gradient.parts
    opt.zero_grad()
    assert not model.embedding.row_gradient.parts
    dense = make_optimizer(model, "adam")
    assert type(dense) is torch.optim.Adam and model.embedding.row_gradient is None
    model.loss(batch, model(batch))["total"].backward()
    assert model.embedding.table.weight.grad is not None  # back to dense gradients
    with pytest.raises(ValueError, match="embedding_optimizer"):
        make_optimizer(model, "sgd")


@pytest.mark.parametrize("name", sorted(registry.names()))
def test_every_registry_model_trains_with_lazy_tables(name):
    """Two steps with the loop's optimiser: loss finite, looked-up rows move, other rows do not
    (except AITM, whose L2 term over the whole table makes every step dense)."""
    torch.manual_seed(0)
    spec = make_spec(n_sparse=4, vocab=12, n_multi=1, n_dense=2)
    options = registry.preset_options(name, "fast")
    if name == "cstwa":  # graphs are tested in test_cstwa / test_graph
        options["structure_migrator"] = False
    model = registry.build(name, spec, options)
    assert type(make_optimizer(model)) is (torch.optim.Adam if name == "aitm" else LazyEmbeddingAdam)
    opt = make_optimizer(model, "lazy_adam")  # AITM: its whole-table L2 takes the dense fallback
    tables = [m for m in model.modules() if isinstance(m, EmbeddingArch)]
    assert isinstance(opt, LazyEmbeddingAdam) and tables
    batch = make_batch(spec, 64, seed=1)
    batch["sparse"][:, 3] = batch["sparse"][:, 3] % 6  # field f3 never reads indices 6..11
    before = [t.table.weight.detach().clone() for t in tables]
    for _ in range(2):
        terms = model.loss(batch, model(batch))
        assert math.isfinite(float(terms["total"].detach()))
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
    for t, w0 in zip(tables, before):
        unread = t.offsets[3] + torch.arange(6, 12)
        read = t.offsets[3] + torch.arange(0, 6)
        assert not torch.equal(t.table.weight[read], w0[read])
        if name == "aitm":
            assert not torch.equal(t.table.weight[unread], w0[unread])
        else:
            assert torch.equal(t.table.weight[unread], w0[unread])


def test_weights_changed_between_backward_and_step_are_read_again():
    """The optimiser reuses the rows the lookup read only while the table is unchanged."""
    runs = []
    for poke_before_forward in (True, False):
        arch = table(6)
        opt = LazyEmbeddingAdam([], [arch], lr=0.1)
        batch = BATCHES[0]
        if poke_before_forward:
            with torch.no_grad():
                arch.table.weight.add_(0.5)
        opt.zero_grad()
        step_loss(arch, batch, coef(batch, 1)).backward()
        if not poke_before_forward:
            with torch.no_grad():
                arch.table.weight.add_(0.5)  # after the lookup: the update must start from these
        opt.step()
        runs.append(arch.table.weight.detach().clone())
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


def test_registry_rejects_an_unknown_embedding_optimizer():
    with pytest.raises(ValueError, match="embedding_optimizer must be one of"):
        registry.build("esmm", make_spec(), {"embedding_optimizer": "sgd"})
    assert registry.preset_options("esmm", "paper")["embedding_optimizer"] == "lazy_adam"
    assert registry.preset_options("aitm", "paper")["embedding_optimizer"] == "adam"


def test_lazy_optimizer_reads_a_dense_adam_state():
    """A checkpoint written with embedding_optimizer=adam (or before the row-wise optimiser)
    resumes under lazy_adam with its moments: each parameter gets its own Adam state back."""
    spec = make_spec(n_sparse=4, vocab=12)
    torch.manual_seed(0)
    model = registry.build("esmm", spec, registry.preset_options("esmm", "fast"))
    batch = make_batch(spec, 64, seed=1)
    dense = make_optimizer(model, "adam")
    for _ in range(2):
        dense.zero_grad()
        model.loss(batch, model(batch))["total"].backward()
        dense.step()
    saved = dense.state_dict()
    lazy = make_optimizer(model, "lazy_adam")
    lazy.load_state_dict(saved)
    order = list(model.parameters())
    for p in (model.embedding.table.weight, model.towers.towers[1].net[0].weight):
        expected = saved["state"][next(i for i, q in enumerate(order) if q is p)]
        assert torch.equal(lazy.state[p]["exp_avg"], expected["exp_avg"]) and float(lazy.state[p]["step"]) == 2
    lazy.zero_grad()
    model.loss(batch, model(batch))["total"].backward()
    lazy.step()
    assert float(lazy.state[model.embedding.table.weight]["step"]) == 3
    assert torch.equal(lazy.state[model.embedding.table.weight]["exp_avg"],
                       lazy._packed[model.embedding.table.weight][:, 0])  # packed again on the step
