"""The training loop: determinism, kill + resume, early stopping on valid, NaN guard, checkpoints,
and one experiment end to end (features on disk -> train -> test metrics -> report)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import Tensor

from cvr_spark import losses
from cvr_spark.models.base import MLP, CVRModel, EmbeddingArch, FeatureSpec, ModelConfig
from cvr_spark.train import checkpoint as ckpt
from cvr_spark.train.experiment import make_train_config, parse_overrides
from cvr_spark.train.loop import TrainConfig, amp_supported, fit, predict, validation_score

SPEC = FeatureSpec(sparse_fields=("101", "205", "301"), sparse_vocab=(200, 15, 4),
                   groups={"101": "user", "205": "item", "301": "context"})


def synth(n: int, seed: int, invert: bool = False) -> dict[str, Tensor]:
    """Rows whose click depends on fields 101 and 301 and conversion on 205, through per-id
    effects shared by every split (graded, so AUC keeps improving over a few epochs).

    ``invert`` flips both labels (a split that disagrees with the training data)."""
    fixed = torch.Generator().manual_seed(1234)
    effects = [torch.randn(v, generator=fixed) * 1.5 for v in SPEC.sparse_vocab]
    g = torch.Generator().manual_seed(seed)
    sparse = torch.stack([torch.randint(0, v, (n,), generator=g) for v in SPEC.sparse_vocab], 1)  # [N, F]
    p_click = torch.sigmoid(effects[0][sparse[:, 0]] + effects[2][sparse[:, 2]] - 0.5)
    click = (torch.rand(n, generator=g) < p_click).float()
    conv = (torch.rand(n, generator=g) < torch.sigmoid(effects[1][sparse[:, 1]])).float()
    if invert:
        click = 1 - click
        conv = 1 - conv
    return {"sparse": sparse, "click": click, "conversion": conv * click,
            "user_key": torch.randint(0, 50, (n,), generator=g), "sample_id": torch.arange(n)}


class TensorLoader:
    """The loader interface (``set_epoch``, ``__len__``, dict batches) over in-memory tensors;
    shuffling depends on (seed, epoch) only, like FeatureLoader."""

    def __init__(self, data: Mapping[str, Tensor], batch_size: int, shuffle: bool = True, seed: int = 0) -> None:
        self.data, self.batch_size, self.shuffle, self.seed, self.epoch = dict(data), batch_size, shuffle, seed, 0
        self.n = int(data["click"].shape[0])
        self.table_version = 7

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        for start in range(0, self.n, self.batch_size):
            idx = order[start:start + self.batch_size]
            yield {k: v[idx] for k, v in self.data.items()}


class TinyModel(CVRModel):
    """Shared embedding -> MLP with dropout -> (ctr, cvr) logits; ESMM-style loss.

    ``fail_at_step`` raises after that many optimiser steps (a simulated kill); ``nan_at_step``
    poisons the weights (NaN outputs); ``inf_loss_at_step`` makes the CTCVR term infinite."""

    def __init__(self, spec: FeatureSpec = SPEC, cfg: ModelConfig | None = None) -> None:
        super().__init__(spec, cfg or ModelConfig(embedding_dim=4, lr=0.05, batch_size=100))
        self.emb = EmbeddingArch(spec, self.cfg.embedding_dim)
        self.net = MLP(self.emb.out_dim, [16], dropout=0.2, out_dim=2)
        self.steps, self.fail_at_step, self.nan_at_step, self.inf_loss_at_step = 0, None, None, None

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        p = torch.sigmoid(self.net(self.emb.flat(batch)))  # [B, 2]
        return {"p_ctr": p[:, 0], "p_cvr": p[:, 1], "p_ctcvr": p[:, 0] * p[:, 1]}

    def loss(self, batch: Mapping[str, Tensor], out: Mapping[str, Tensor]) -> dict[str, Tensor]:
        ctr = losses.exposure_mean(losses.bce(out["p_ctr"], batch["click"]))
        ctcvr = losses.exposure_mean(losses.bce(out["p_ctcvr"], batch["click"] * batch["conversion"]))
        if self.inf_loss_at_step is not None and self.steps >= self.inf_loss_at_step:
            ctcvr = ctcvr * float("inf")
        return {"ctr": ctr, "ctcvr": ctcvr, "total": ctr + ctcvr}

    def on_train_batch_end(self, batch: Mapping[str, Tensor], out: Mapping[str, Tensor]) -> None:
        self.steps += 1
        if self.steps == self.fail_at_step:
            raise KeyboardInterrupt(f"simulated kill after step {self.steps}")
        if self.steps == self.nan_at_step:
            with torch.no_grad():
                self.net.net[0].weight.fill_(float("nan"))


def make_model(seed: int = 0, embedding_optimizer: str = "lazy_adam") -> TinyModel:
    torch.manual_seed(seed)
    return TinyModel(cfg=ModelConfig(embedding_dim=4, lr=0.05, batch_size=100, embedding_optimizer=embedding_optimizer))


def loaders(train_seed: int = 1, valid_invert: bool = False) -> tuple[TensorLoader, TensorLoader]:
    return (TensorLoader(synth(1000, train_seed), 100, seed=3),
            TensorLoader(synth(600, 2, invert=valid_invert), 300, shuffle=False))


def quiet(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 3, "patience": 0, "progress": False, "num_threads": 1, **kw})


def valid_history(result: dict) -> str:
    """The per-epoch validation metrics as JSON (NaN-safe equality: NaN != NaN in Python)."""
    return json.dumps([h["valid"] for h in result["history"]], sort_keys=True)


def weights(model: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_same_seed_same_metrics_and_checkpoint_loads_weights_only(tmp_path):
    runs = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        model = make_model(seed)
        result = fit(model, *loaders(), quiet(seed=seed), tmp_path / name)
        runs.append((result, weights(model)))
    (ra, wa), (rb, wb), (rc, wc) = runs
    assert valid_history(ra) == valid_history(rb) != valid_history(rc)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert ra["valid"]["ctr_auc"] > 0.7 and ra["table_versions"] == {"train": 7, "valid": 7}
    state = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 3 and state["step"] == 30 and state["config"]["seed"] == 5
    assert state["table_versions"]["train"] == 7 and len(state["rng"]) == 1
    assert set(state["rng"][0]) >= {"python", "numpy", "torch"}
    assert state["loop"]["done"] and state["best_model"] is not None


def test_amp_on_cpu_autocasts_to_bfloat16_where_the_cpu_has_it(tmp_path, caplog):
    """train.amp=true on CPU: bfloat16 autocast (the MLP's matmuls run in bfloat16, losses in
    float32) on a CPU with native bfloat16, else a warning and float32; float16 never on CPU."""
    assert not amp_supported(torch.device("cpu"), "float16")
    assert amp_supported(torch.device("cuda"), "float16") and amp_supported(torch.device("cuda"), "bfloat16")
    native = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    assert amp_supported(torch.device("cpu"), "bfloat16") == native
    seen = []
    for amp in (False, True):
        model = make_model(4)
        hook = model.net.net[0].register_forward_hook(lambda m, i, o: seen.append((model.training, o.dtype)))
        with caplog.at_level("WARNING", logger="cvr_spark.train.loop"):
            result = fit(model, *loaders(), quiet(epochs=1, amp=amp), tmp_path / f"amp{amp}")
        hook.remove()
        train_dtypes = {dtype for training, dtype in seen if training}
        assert train_dtypes == ({torch.bfloat16} if amp and native else {torch.float32}), (amp, train_dtypes)
        assert {dtype for training, dtype in seen if not training} == {torch.float32}  # evaluation
        assert math.isfinite(result["history"][0]["train_loss"]) and result["valid"]["ctr_auc"] > 0.6
        seen.clear()
    assert ("train.amp=true ignored" in caplog.text) == (not native)
    with caplog.at_level("WARNING", logger="cvr_spark.train.loop"):
        fit(make_model(4), *loaders(), quiet(epochs=1, amp=True, amp_dtype="float16"), tmp_path / "fp16")
    assert "train.amp=true ignored: float16 autocast needs a CUDA device" in caplog.text


def _compiled_run(tmp_path: Path, name: str, compile: bool, dropout: float) -> tuple[dict, dict, set]:
    """A 2-epoch TinyModel run with ``train.compile`` on or off and the MLP's dropout set; returns
    (result, final weights, whether the training forward's first layer was traced by dynamo)."""
    model = make_model(8)
    torch.manual_seed(8)
    model.net = MLP(model.emb.out_dim, [16], dropout=dropout, out_dim=2)
    traced = set()
    model.net.net[0].register_forward_hook(lambda m, i, o: traced.add(torch.compiler.is_compiling()))
    result = fit(model, *loaders(), quiet(epochs=2, compile=compile), tmp_path / name)
    return result, weights(model), traced


def test_compile_trains_what_eager_trains_and_is_reproducible(tmp_path):
    """train.compile=true runs the training forward through TorchInductor (the row-wise embedding
    lookups stay eager). Without dropout it ends where the eager run ends, up to the rounding of
    fused kernels; with dropout (masks from Inductor's generator, seeded by torch's) two runs of
    one seed are identical and still learn."""
    eager, w_eager, traced_eager = _compiled_run(tmp_path, "eager", False, 0.0)
    compiled, w_compiled, traced = _compiled_run(tmp_path, "compiled", True, 0.0)
    assert traced_eager == {False} and True in traced  # the training forward was compiled
    for key in w_eager:
        torch.testing.assert_close(w_compiled[key], w_eager[key], rtol=1e-4, atol=1e-5, msg=key)
    assert compiled["valid"]["ctr_auc"] == pytest.approx(eager["valid"]["ctr_auc"], abs=1e-4)
    (a, wa, _), (b, wb, _) = (_compiled_run(tmp_path, n, True, 0.3) for n in ("a", "b"))
    assert valid_history(a) == valid_history(b) and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["valid"]["ctr_auc"] > 0.7
    with pytest.raises(ValueError, match="train.compile_mode must be one of"):
        TrainConfig(compile_mode="fast")


def test_compile_on_cpu_without_a_cpp_compiler_fails_before_training(monkeypatch):
    from cvr_spark.train import loop

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(loop.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="train.compile=true on CPU needs a C\\+\\+ compiler"):
        loop.compile_net(torch.nn.Linear(2, 2), torch.device("cpu"))
    monkeypatch.setenv("CXX", "/opt/cc/bin/g++")  # CXX names one: accepted (not run here)
    assert isinstance(loop.compile_net(torch.nn.Linear(2, 2), torch.device("cpu")), torch.nn.Module)


# killed during step 14 (last checkpoint: step 12, mid-epoch) / step 21 (last: end of epoch 1)
@pytest.mark.parametrize("embedding_optimizer", ["lazy_adam", "adam"])
@pytest.mark.parametrize("kill_step", [14, 21])
def test_kill_and_resume_gives_the_same_final_weights(tmp_path, kill_step, embedding_optimizer):
    cfg = quiet(checkpoint_every=4, seed=2)
    ref = make_model(2, embedding_optimizer)
    ref_result = fit(ref, *loaders(), cfg, tmp_path / "ref")

    killed = make_model(2, embedding_optimizer)
    killed.fail_at_step = kill_step
    with pytest.raises(KeyboardInterrupt):
        fit(killed, *loaders(), cfg, tmp_path / "run")
    saved = ckpt.load_checkpoint(tmp_path / "run")
    assert saved["step"] == {14: 12, 21: 20}[kill_step]
    # the embedding table's Adam moments are in the checkpoint (lazy: rows never read stay 0)
    (table_state,) = [s for s in saved["optimizer"]["state"].values() if s["exp_avg"].shape == (219, 4)]
    assert float(table_state["step"]) == saved["step"]
    assert (embedding_optimizer == "lazy_adam") == bool((table_state["exp_avg"].abs().sum(1) == 0).any())

    resumed = make_model(99, embedding_optimizer)  # a fresh process: other initial weights, other RNG state
    result = fit(resumed, *loaders(), cfg, tmp_path / "run")
    assert result["steps"] == ref_result["steps"] == 30
    ref_w, res_w = weights(ref), weights(resumed)
    assert all(torch.equal(ref_w[k], res_w[k]) for k in ref_w), "resumed run diverged"
    assert valid_history(result) == valid_history(ref_result)
    assert [h["train_loss"] for h in result["history"]] == pytest.approx(
        [h["train_loss"] for h in ref_result["history"]], rel=1e-12)


def test_early_stopping_follows_validation_not_test(tmp_path):
    """Valid labels are inverted, so valid and test disagree about the best epoch. Early stopping
    must pick the best *valid* epoch and restore its weights; test prefers a later epoch."""
    from cvr_spark.evaluate.metrics import compute_metrics

    train, valid = loaders(valid_invert=True)
    test = TensorLoader(synth(600, 4), 300, shuffle=False)
    model = make_model(0)
    result = fit(model, train, valid, quiet(epochs=8, patience=2, seed=0), tmp_path / "es")
    scores = [h["score"] for h in result["history"]]
    best = result["best_epoch"]
    assert best == int(np.argmax(scores)) and result["stopped_early"]
    assert result["epochs_run"] == best + 3 < 8
    restored = compute_metrics(predict(model, valid))
    assert restored["ctr_auc"] == pytest.approx(result["history"][best]["valid"]["ctr_auc"], abs=1e-12)

    # Test score after each epoch: training is deterministic, so `epochs=k` is a prefix of the
    # run, and the checkpoint's "model" entry holds the last (not the best) weights.
    test_auc = []
    for k in range(1, result["epochs_run"] + 1):
        m = make_model(0)
        fit(m, train, valid, quiet(epochs=k, patience=0, seed=0), tmp_path / f"k{k}")
        m.load_state_dict(ckpt.load_checkpoint(tmp_path / f"k{k}")["model"])
        test_auc.append(validation_score(compute_metrics(predict(m, test)), TrainConfig()))
    assert int(np.argmax(test_auc)) != best, f"valid and test should disagree here: {scores} {test_auc}"
    test_now = validation_score(compute_metrics(predict(model, test)), TrainConfig())
    assert test_now == pytest.approx(test_auc[best], abs=1e-12)


def test_nan_guard_names_step_and_terms(tmp_path):
    model = make_model(0)
    model.inf_loss_at_step = 13  # steps 1..13 run; the 14th loss is infinite (epoch 1, batch 3)
    with pytest.raises(FloatingPointError, match=r"epoch 1, step 14 \(batch 3 .*ctr=0\.\d+, ctcvr=inf, total=inf"):
        fit(model, *loaders(), quiet(), tmp_path / "inf")
    model = make_model(0)
    model.nan_at_step = 3
    with pytest.raises(FloatingPointError, match=r"outputs \['p_ctr', 'p_cvr', 'p_ctcvr'\] at epoch 0, step 4"):
        fit(model, *loaders(), quiet(), tmp_path / "nan")


def test_metric_mode_and_errors(tmp_path):
    assert TrainConfig(early_stop_metric="logloss_ctr").early_stop_mode == "min"
    assert TrainConfig().metric_names == ["ctr_auc", "ctcvr_auc"]
    with pytest.raises(ValueError, match="train.epochs"):
        TrainConfig(epochs=0)
    for name in ("nope", "pcoc_ctr", "cvr_auc_true_all", "ctr_auc,n_clicks"):  # refused before training
        with pytest.raises(ValueError, match="cannot stop training"):
            TrainConfig(early_stop_metric=name)
    with pytest.raises(KeyError, match="no validation metric 'gauc_ctr'"):  # not computed: no user_key
        validation_score({"ctr_auc": 0.7}, TrainConfig(early_stop_metric="gauc_ctr"))
    assert parse_overrides(["train.patience=3", "model.lr=0.5"]) == ({"patience": 3}, {"lr": 0.5})
    with pytest.raises(ValueError, match="train.<name> or model.<name>"):
        parse_overrides(["optim.lr=1"])
    with pytest.raises(ValueError, match="patiance"):
        make_train_config({"patiance": 2})
    assert make_train_config({"patience": 4}, epochs=2, seed=9).patience == 4


def test_validation_score_leaves_out_terms_undefined_on_the_split(caplog):
    cfg = TrainConfig()  # ctr_auc,ctcvr_auc
    assert validation_score({"ctr_auc": 0.7, "ctcvr_auc": 0.9}, cfg) == pytest.approx(0.8)
    notes = ["ctcvr_auc: only label 0 in its sample space (600 rows), NaN", "pcoc_cvr_clicked: no positives"]
    with caplog.at_level("WARNING"):
        assert validation_score({"ctr_auc": 0.7, "ctcvr_auc": float("nan"), "notes": notes}, cfg) == 0.7
    assert "leaves out ['ctcvr_auc']" in caplog.text and "only label 0" in caplog.text
    assert "pcoc_cvr_clicked" not in caplog.text
    assert validation_score({"ctr_auc": None, "ctcvr_auc": 0.6}, cfg) == 0.6
    with pytest.raises(ValueError, match="undefined on the validation split.*only label 0"):
        validation_score({"ctr_auc": float("nan"), "ctcvr_auc": float("nan"), "notes": notes}, cfg)


def test_early_stopping_with_an_undefined_metric_still_follows_the_defined_one(tmp_path):
    """No conversion in the validation split: ctcvr_auc is NaN in every epoch; the stopping score
    is ctr_auc alone, so the best epoch is not stuck at the first one."""
    train, valid = loaders()
    valid.data["conversion"] = torch.zeros_like(valid.data["conversion"])
    result = fit(make_model(0), train, valid, quiet(epochs=3, seed=0), tmp_path / "r")
    ctr = [h["valid"]["ctr_auc"] for h in result["history"]]
    assert all(math.isnan(h["valid"]["ctcvr_auc"]) for h in result["history"])
    assert [h["score"] for h in result["history"]] == ctr
    assert result["best_epoch"] == int(np.argmax(ctr))


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    out = tmp_path / "run"
    meta = {"model_name": "tiny", "model_options": {"lr": 0.05}, "job": {"data_dir": "/data/a"}}
    fit(make_model(0), *loaders(), quiet(epochs=1, seed=4), out, meta=meta, record={"first": True})
    assert json.loads((out / "config.json").read_text()) == {"first": True}
    before = (out / "checkpoint.pt").read_bytes()
    others = [(quiet(epochs=2, seed=5), meta, "train.seed: 4 -> 5"),
              (quiet(epochs=2, seed=4, early_stop_metric="logloss_ctr"), meta, "train.early_stop_metric"),
              (quiet(epochs=2, seed=4), {**meta, "model_options": {"lr": 0.5}}, "model.lr: 0.05 -> 0.5"),
              (quiet(epochs=2, seed=4), {**meta, "job": {"data_dir": "/data/b"}}, "data_dir: '/data/a' -> '/data/b'")]
    for cfg, other, message in others:
        with pytest.raises(ValueError, match=f"written by another run.*{message}.*train.resume=false"):
            fit(make_model(0), *loaders(), cfg, out, meta=other, record={"first": False})
    train, valid = loaders()
    train.table_version = 8  # the features table was rebuilt since
    with pytest.raises(ValueError, match="table_version.train: 7 -> 8"):
        fit(make_model(0), train, valid, quiet(epochs=2, seed=4), out, meta=meta)
    assert (out / "checkpoint.pt").read_bytes() == before  # refused: nothing replaced
    assert json.loads((out / "config.json").read_text()) == {"first": True}
    # options that do not change a step may differ (more epochs, threads, logging) ...
    result = fit(make_model(0), *loaders(), quiet(epochs=2, seed=4, num_threads=2, log_every=7), out, meta=meta)
    assert result["epochs_run"] == 2 and result["history"][0]["epoch"] == 0  # epoch 0 resumed, not retrained
    # ... and resume=false starts over
    result = fit(make_model(0), *loaders(), quiet(epochs=1, seed=5, resume=False), out, meta=meta)
    assert result["epochs_run"] == 1 and ckpt.load_checkpoint(out)["config"]["seed"] == 5


# ---- features on disk (the feature job's versioned Parquet layout) and a whole experiment ----

FIELDS = {"101": 30, "121": 5, "205": 25, "301": 4}


def write_features(data_dir: Path, n: int = 3000, seed: int = 0, rows_per_group: int = 250) -> Path:
    """A features table (features/v=0/split=*/part-*.parquet + _latest) and its manifest."""
    rng = np.random.default_rng(seed)
    cols = {f: rng.integers(0, v, n).astype(np.int32) for f, v in FIELDS.items()}
    click = (rng.random(n) < np.where(cols["101"] % 3 == 0, 0.7, 0.15)).astype(np.int32)
    conv = click * (rng.random(n) < np.where(cols["205"] < 8, 0.6, 0.1)).astype(np.int32)
    split = rng.choice(["train", "valid", "test"], n, p=[0.6, 0.2, 0.2])
    table = pa.table({"sample_id": np.arange(n, dtype=np.int64), **cols, "click": click, "conversion": conv,
                      "user_key": cols["101"].astype(np.int64), "item_key": cols["205"].astype(np.int64)})
    for name in ("train", "valid", "test"):
        part = table.filter(pa.array(split == name))
        out = data_dir / "features" / "v=0" / f"split={name}" / "part-00000.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(part, out, row_group_size=rows_per_group)
    (data_dir / "features" / "_latest").write_text("0")
    fields = [{"name": f, "group": {"101": "user", "121": "user", "205": "item"}.get(f, "context"),
               "multi": False, "vocab_size": v} for f, v in FIELDS.items()]
    manifest = {"fields": fields, "tables": {"features": {"path": "features", "format": "parquet", "version": 0}}}
    (data_dir / "manifest.json").write_text(json.dumps(manifest))
    return data_dir


def _job(name: str):
    import runpy

    return runpy.run_path(str(Path(__file__).resolve().parent.parent / "jobs" / f"{name}.py"))["main"]


def test_experiment_end_to_end_in_process(tmp_path, capsys):
    """jobs/train.py -> run_train (in process) -> layout, metrics, report; jobs/evaluate.py agrees."""
    data = write_features(tmp_path / "data")
    out = tmp_path / "runs"
    assert _job("train")(["--data", str(data), "--model", "esmm", "--preset", "fast", "--epochs", "2",
                          "--seeds", "1,2", "--out", str(out), "train.progress=false", "train.num_threads=1",
                          "model.batch_size=200"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [r["seed"] for r in printed["runs"]] == [1, 2]
    test_auc = []
    for seed in (1, 2):
        run_dir = out / "esmm" / f"seed{seed}"
        assert {p.name for p in run_dir.iterdir()} >= {"checkpoint.pt", "metrics.json", "config.json"}
        record = json.loads((run_dir / "metrics.json").read_text())
        assert record["table_versions"] == {"train": 0, "valid": 0, "test": 0}
        assert record["test"]["ctr_auc"] > 0.6 and len(record["history"]) == 2
        assert json.loads((run_dir / "config.json").read_text())["model_options"]["batch_size"] == 200
        test_auc.append(record["test"]["ctr_auc"])
    assert test_auc[0] != test_auc[1]
    assert (out / "results.md").is_file()
    assert _job("evaluate")(["--run", str(out / "esmm" / "seed1" / "checkpoint.pt"), "--data", str(data)]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["metrics"]["ctr_auc"] == pytest.approx(test_auc[0], abs=1e-12)


def test_train_command_checks_its_arguments_before_training(tmp_path, capsys, monkeypatch):
    import torch

    from cvr_spark.cli import main

    data, out = write_features(tmp_path / "data"), tmp_path / "runs"
    base = ["train", "--data", str(data), "--out", str(out), "--preset", "fast", "--epochs", "1"]
    refused = [(["--model", "esmm,esmm"], "model(s) ['esmm'] given more than once"),
               (["--model", "esmm", "--seeds", "3,1,3"], "seed(s) ['3'] given more than once"),
               (["--model", "esmm,nope", "--seeds", "1,2"], "nope"),
               (["--model", "esmm", "model.nope=2"], "override: key 'model.nope' of model 'esmm'"),
               (["--model", "esmm", "train.early_stop_metric=pcoc_ctr"], "cannot stop training"),
               (["--model", "esmm", "--data", str(tmp_path / "missing")], "missing")]
    for extra, message in refused:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)
    for seeds in ("1,a", ","):
        with pytest.raises(SystemExit) as stop:
            main(base + ["--model", "esmm", "--seeds", seeds])
        assert stop.value.code == 2 and "comma-separated integers" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(base + ["--model", "esmm", "--use-gpu"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not out.exists(), "a refused command must not train anything"


def test_evaluate_reads_the_table_version_the_run_trained_on(tmp_path, caplog):
    import shutil

    from cvr_spark.train.experiment import run_evaluate, run_train

    data = write_features(tmp_path / "data")
    run_train(data, ["esmm"], [1], "fast", 1, out_dir=tmp_path / "runs",
              overrides=["train.progress=false", "train.num_threads=1", "model.batch_size=200"])
    run = tmp_path / "runs" / "esmm" / "seed1"
    v0_test = pq.read_table(data / "features" / "v=0" / "split=test").num_rows
    # the feature job ran again: version 1 (half the test rows) is now the manifest's
    for part in (data / "features" / "v=0").glob("split=*/*.parquet"):
        table = pq.read_table(part)
        dest = data / "features" / "v=1" / part.parent.name / part.name
        dest.parent.mkdir(parents=True)
        pq.write_table(table.slice(0, table.num_rows // 2), dest)
    (data / "features" / "_latest").write_text("1")
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["tables"]["features"]["version"] = 1
    (data / "manifest.json").write_text(json.dumps(manifest))
    result = run_evaluate(run, data)
    assert result["table_version"] == 0 and result["metrics"]["n_impressions"] == v0_test
    shutil.copytree(data, tmp_path / "copy")  # another folder: its manifest's version, with a warning
    with caplog.at_level("WARNING"):
        result = run_evaluate(run, tmp_path / "copy")
    assert result["table_version"] == 1 and result["metrics"]["n_impressions"] == v0_test // 2
    assert "not the run's training data" in caplog.text


class FakeMlflow:
    """Records what the experiment logs (the mlflow API the experiment uses); ``broken``: the
    tracking store cannot be opened."""

    def __init__(self, broken: bool = False) -> None:
        self.broken, self.runs = broken, []

    def get_tracking_uri(self) -> str:
        return "sqlite:///nowhere/mlflow.db"

    def MlflowClient(self):  # noqa: N802  (the mlflow name)
        fake = self

        class Client:
            def search_experiments(self, max_results: int):
                if fake.broken:
                    raise OSError("unable to open database file")
                return []
        return Client()

    def start_run(self, run_name: str):
        import contextlib

        self.runs.append({"name": run_name, "params": {}, "metrics": [], "tags": {}, "artifacts": []})
        return contextlib.nullcontext()

    def log_params(self, params):
        self.runs[-1]["params"].update(params)

    def log_metrics(self, metrics, step=None):
        self.runs[-1]["metrics"].append((step, dict(metrics)))

    def set_tags(self, tags):
        self.runs[-1]["tags"].update(tags)

    def log_artifacts(self, path):
        self.runs[-1]["artifacts"].append(path)


def test_experiment_logs_each_run_to_mlflow_and_checks_the_store_first(tmp_path, monkeypatch):
    import sys

    from cvr_spark.train.experiment import run_train

    data = write_features(tmp_path / "data")
    over = ["train.progress=false", "train.num_threads=1", "model.batch_size=200"]
    broken = FakeMlflow(broken=True)
    monkeypatch.setitem(sys.modules, "mlflow", broken)
    with pytest.raises(RuntimeError, match=r"tracking store 'sqlite:///nowhere/mlflow.db' cannot be used "
                                           r"\(OSError: unable to open database file\).*train.mlflow=false"):
        run_train(data, ["esmm"], [1], "fast", 2, 1, tmp_path / "broken", over, use_gpu=False)
    assert not (tmp_path / "broken").exists()  # failed before training
    run_train(data, ["esmm"], [1], "fast", 1, 1, tmp_path / "off", over + ["train.mlflow=false"], use_gpu=False)
    assert broken.runs == []  # logging off: the store is not even opened

    fake = FakeMlflow()
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    result = run_train(data, ["esmm"], [1, 2], "fast", 2, 1, tmp_path / "runs", over, use_gpu=False)
    assert [r["name"] for r in fake.runs] == ["esmm-seed1", "esmm-seed2"]
    for logged, run in zip(fake.runs, result["runs"]):
        record = json.loads((Path(run["run_dir"]) / "metrics.json").read_text())
        assert logged["params"]["model.batch_size"] == "200" and logged["params"]["train.epochs"] == "2"
        history = [(step, m) for step, m in logged["metrics"] if step is not None]
        assert history == [(h["epoch"], {"train_loss": h["train_loss"], "valid_score": h["score"]})
                           for h in record["history"]] and len(history) == 2
        (_, test), = [(step, m) for step, m in logged["metrics"] if step is None]
        assert test["test_ctr_auc"] == record["test"]["ctr_auc"] and "test_cvr_auc_clicked" in test
        assert logged["tags"] == {"table_version.train": "0", "table_version.valid": "0", "table_version.test": "0"}
        assert logged["artifacts"] == [run["run_dir"]]


def test_load_truth_matches_the_feature_jobs_shifted_test_ids(tmp_path):
    """The simulator keys truth by raw-file id + file split; features shift test ids by 2**57."""
    from deltalake import write_deltalake

    from cvr_spark.data.sources import SAMPLE_ID_OFFSET
    from cvr_spark.train.experiment import load_truth

    # Raw ids 1..3 occur in both files (as in Ali-CCP); the truth differs per file.
    truth = pa.table({"sample_id": [1, 2, 3, 1, 2, 3], "split": ["train"] * 3 + ["test"] * 3,
                      "p_cvr": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                      "potential_conversion": [0, 1, 0, 1, 0, 1]})
    write_deltalake(str(tmp_path / "truth"), truth)
    manifest = {"tables": {"truth": {"path": "truth", "format": "delta", "version": 0}}}
    test = SAMPLE_ID_OFFSET["test"]
    ids = np.array([test + 3, 2, test + 1], dtype=np.int64)  # predictions in any order
    got = load_truth(tmp_path, manifest, ids)
    assert got["p_cvr_true"].tolist() == [0.6, 0.2, 0.4]
    assert got["potential_conversion"].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="no row for 1 predicted"):
        load_truth(tmp_path, manifest, np.array([2, test + 7], dtype=np.int64))
    assert load_truth(tmp_path, {"tables": {}}, ids) is None
