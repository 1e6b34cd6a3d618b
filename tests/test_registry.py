"""Every registered model: builds from both presets, trains one step through the common
``loss()['total'].backward()``, and is listed by ``cvr-spark models``."""
from __future__ import annotations

import math

import pytest
import torch

from cvr_spark.cli import main
from cvr_spark.models import registry
from tests.model_testing import bfloat16_loss, make_batch, make_spec, params_outside_graph

EXPECTED = {
    "mlp", "esmm", "omoe", "mmoe", "cgc", "ple", "aitm", "escm2_ipw", "escm2_dr", "dcmt", "ukd",
    "ddpo", "nise", "cstwa", "chorus", "esmm+ctnocvr", "mmoe+ctnocvr", "cgc+ctnocvr",
}


ALL_NAMES = sorted(EXPECTED | set(registry.names()))


def _build(name: str, preset: str) -> tuple:
    """(model, spec): ``name`` from ``preset`` on a small spec, seeded. CSTWA without its
    structure migrator: graphs are tested in test_cstwa / test_graph; here the rest of the model."""
    torch.manual_seed(0)
    spec = make_spec(n_sparse=4, vocab=12)
    options = registry.preset_options(name, preset)
    if name == "cstwa":
        options["structure_migrator"] = False
    return registry.build(name, spec, options), spec


def test_registry_has_every_model_of_the_issue():
    assert EXPECTED <= set(registry.names())


@pytest.mark.parametrize("clicks", [True, False])
@pytest.mark.parametrize("preset", ["fast", "paper"])
@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_model_trains_one_step(name, preset, clicks):
    model, spec = _build(name, preset)
    model.train()
    batch = make_batch(spec, 64, seed=1)
    if not clicks:  # a batch without clicks (common at Ali-CCP's 4% CTR with small batches)
        batch["click"].zero_()
        batch["conversion"].zero_()
    out = model(batch)
    for key in ("p_ctr", "p_cvr", "p_ctcvr", model.cvr_output, model.ctcvr_output):
        assert out[key].shape == (64,)
        assert bool(((out[key] >= 0) & (out[key] <= 1)).all()), key
    terms = model.loss(batch, out)
    assert "total" in terms and math.isfinite(float(terms["total"].detach()))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    terms["total"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert params_outside_graph(model) == []  # DDP's find_unused_parameters=False
    opt.step()


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_model_trains_one_step_under_bfloat16_autocast(name):
    """train.amp=true: the loop's forward under CPU bfloat16 autocast, outputs cast back to
    float32 for the losses (cvr_spark.train.loop), gives finite losses and gradients."""
    model, spec = _build(name, "paper")
    terms = bfloat16_loss(model, make_batch(spec, 64, seed=1))
    assert all(math.isfinite(float(v.detach())) for v in terms.values())
    terms["total"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) and g.dtype == torch.float32 for g in grads)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_model_traces_under_torch_compile(name):
    """train.compile=true: torch.compile's tracing (dynamo + AOTAutograd, with the "aot_eager"
    backend: Inductor's code generation is tested in test_loop, and costs seconds per model) of
    every model gives the eager model's loss and gradients (eval mode: no dropout draws), and a
    training-mode step through the compiled forward has finite gradients."""
    model, spec = _build(name, "paper")
    model.eval()
    batch = make_batch(spec, 64, seed=1)
    compiled = torch.compile(model, backend="aot_eager")
    results = []
    for net in (model, compiled):
        model.zero_grad(set_to_none=True)
        total = model.loss(batch, net(batch))["total"]
        total.backward()
        results.append((total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss, grads), (c_loss, c_grads) = results
    torch.testing.assert_close(c_loss, loss)
    assert c_grads.keys() == grads.keys()
    for key in grads:
        torch.testing.assert_close(c_grads[key], grads[key], rtol=1e-4, atol=1e-6, msg=key)
    model.train()
    model.zero_grad(set_to_none=True)
    model.loss(batch, compiled(batch))["total"].backward()
    assert params_outside_graph(model) == []
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)


def test_models_command_prints_one_entry_per_name(capsys):
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert len(lines) == len(registry.names()) >= len(EXPECTED)  # one line per name (+ the graph job's ctr)
    for name in EXPECTED:
        (line,) = [ln for ln in lines if ln.startswith(name + " ")]
        _, paper, outputs, options = (part.strip() for part in line.split(" | "))
        assert paper and "p_ctr" in outputs and "CVR: " in outputs and options.startswith("options: ")
