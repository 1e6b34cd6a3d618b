"""Graph job: FAISS top-K vs brute force, normalisation, modal values, publish / refresh /
failure, pinning, loading into CSTWA, and the CLI config."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from deltalake import write_deltalake

from cvr_spark.graph import job as graph_job
from cvr_spark.graph import store
from cvr_spark.graph.job import GraphConfig, run_graph
from cvr_spark.graph.knn import knn_local, knn_spark
from cvr_spark.graph.pretrain import PretrainConfig, load_embeddings
from cvr_spark.graph.represent import modal_frame_spark, modal_values, node_table_numpy, representations
from cvr_spark.graph.store import build_edges, load_structure_graphs, read_manifest
from cvr_spark.models import registry
from cvr_spark.models.base import FeatureSpec
from cvr_spark.models.cstwa_graph import graph_fields
from cvr_spark.train.checkpoint import save_checkpoint

USERS, ITEMS, CLUSTERS = 40, 30, 4
FIELDS = {"101": ("user", USERS + 1), "121": ("user", CLUSTERS + 1), "205": ("item", ITEMS + 1),
          "206": ("item", CLUSTERS + 1), "301": ("context", 4)}
SPEC = FeatureSpec(sparse_fields=tuple(FIELDS), sparse_vocab=tuple(v for _, v in FIELDS.values()),
                   groups={f: g for f, (g, _) in FIELDS.items()})


def brute_force(x: np.ndarray, k: int, include_self: bool) -> tuple[list[set], np.ndarray]:
    """Neighbour sets and sorted similarities of every row by dense numpy cosine."""
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = z @ z.T  # [N, N]
    if not include_self:
        np.fill_diagonal(sim, -np.inf)
    top = np.argsort(-sim, axis=1, kind="stable")[:, :k]  # [N, K]
    return [set(r) for r in top], np.take_along_axis(sim, top, 1)


@pytest.mark.parametrize("include_self", [True, False])
def test_faiss_topk_equals_numpy_brute_force(include_self):
    x = np.random.default_rng(0).normal(size=(300, 12)).astype(np.float32)
    pos, sim = knn_local(x, 8, include_self, batch_size=70, device="cpu")
    sets, ref = brute_force(x.astype(np.float64), 8, include_self)
    assert pos.shape == (300, 8)
    assert [set(r) for r in pos] == sets  # continuous data: no ties
    np.testing.assert_allclose(sim, ref, atol=1e-5)
    assert (pos[:, 0] == np.arange(300)).all() == include_self
    assert (pos != np.arange(300)[:, None]).all() != include_self


def test_self_kept_or_dropped_under_ties():
    x = np.ones((5, 3), np.float32)  # identical vectors: every similarity ties at 1
    pos, sim = knn_local(x, 2, True, device="cpu")
    assert all(i in row for i, row in enumerate(pos)) and np.allclose(sim, 1)
    pos, _ = knn_local(x, 2, False, device="cpu")
    assert pos.shape == (5, 2) and all(i not in row for i, row in enumerate(pos))


def test_spark_knn_equals_local(spark):
    x = np.random.default_rng(1).normal(size=(150, 6)).astype(np.float32)
    local = knn_local(x, 5, False, batch_size=40, device="cpu")  # self handling is shared code
    remote = knn_spark(spark, x, 5, False, batch_size=40, partitions=2)
    np.testing.assert_array_equal(local[0], remote[0])
    np.testing.assert_allclose(local[1], remote[1], atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_search_equals_cpu():
    import faiss

    if faiss.get_num_gpus() == 0 or not hasattr(faiss, "StandardGpuResources"):
        pytest.skip("faiss built without GPU support")
    x = np.random.default_rng(2).normal(size=(500, 20)).astype(np.float32)
    cpu, gpu = knn_local(x, 8, device="cpu"), knn_local(x, 8, device="gpu")
    assert [set(r) for r in cpu[0]] == [set(r) for r in gpu[0]]
    np.testing.assert_allclose(cpu[1], gpu[1], atol=1e-4)


def test_modal_values_rule():
    keys = np.array([1, 1, 1, 2, 2, 3, 3, 3, 3, 5])
    vals = np.array([4, 4, 7, 9, 2, 0, 0, 0, 6, 0])
    # 1: 4 (count 2); 2: tie 9/2 -> 2; 3: 0 is most frequent but missing -> 6; 5: only 0 -> 0
    np.testing.assert_array_equal(modal_values(keys, vals, 7), [-1, 4, 2, 6, -1, 0, -1])


def test_modal_values_spark_matches_numpy(spark):
    rng = np.random.default_rng(3)
    keys, vals = rng.integers(0, 20, 400), rng.integers(0, 4, 400)
    df = spark.createDataFrame([(int(k), int(v)) for k, v in zip(keys, vals)], "k long, v long")
    got = {r["k"]: r["v"] for r in modal_frame_spark(df, "k", ["k", "v"]).collect()}
    ref = modal_values(keys, vals, 20)
    assert got == {k: int(ref[k]) for k in range(20) if ref[k] >= 0}


def test_edges_negatives_self_and_normalisation():
    columns = {"101": np.array([1, 2, 3, 4, 4, 5]), "121": np.array([1, 1, 2, 3, 3, 2])}
    nodes = node_table_numpy(SPEC, "user", columns)
    assert nodes.searchable.tolist() == [False, True, True, True, True, True] + [False] * (USERS - 5)
    rng = np.random.default_rng(4)
    reps = rng.normal(size=(USERS + 1, 5)).astype(np.float32)
    edges = build_edges(nodes, reps, lambda v: knn_local(v, 3, True, device="cpu"))
    ids = np.flatnonzero(nodes.searchable)
    z = reps[ids] / np.linalg.norm(reps[ids], axis=1, keepdims=True)
    dense = np.zeros((USERS + 1, USERS + 1))
    for r, i in enumerate(ids):
        top = np.argsort(-(z @ z[r]))[:3]
        dense[i, ids[top]] = np.maximum(z[top] @ z[r], 0)
    np.testing.assert_allclose(dense[edges.src, edges.dst], edges.similarity, atol=1e-5)
    assert np.count_nonzero(dense) == len(edges.src)  # zero (negative) similarities are not stored
    deg = dense.sum(1)
    expected = dense[edges.src, edges.dst] / np.sqrt(deg[edges.src] * deg[edges.dst])
    np.testing.assert_allclose(edges.weight, expected, rtol=1e-5)
    assert set(edges.src) <= set(ids) and 0 not in set(edges.dst)


# ------------------------------------------------------------------ the job on a small data set

def write_features(data_dir: Path) -> None:
    """Clicks driven by user-cluster x item-cluster affinity; 121 / 206 are the clusters."""
    rng = np.random.default_rng(5)
    n = 1500
    user, item = rng.integers(0, USERS + 1, n), rng.integers(1, ITEMS + 1, n)
    ucl, icl = np.where(user == 0, 0, user % CLUSTERS + 1), item % CLUSTERS + 1
    affinity = np.random.default_rng(6).normal(0, 2, (CLUSTERS + 1, CLUSTERS + 1))
    click = (rng.random(n) < 1 / (1 + np.exp(-affinity[ucl, icl]))).astype(np.int32)
    noisy = np.where(rng.random(n) < 0.1, rng.integers(0, CLUSTERS + 1, n), ucl)  # modes still = ucl
    cols = {"sample_id": pa.array(np.arange(n), pa.int64()), "101": user, "121": noisy, "205": item,
            "206": icl, "301": rng.integers(0, 4, n)}
    table = pa.table({k: pa.array(v, pa.int32()) if k != "sample_id" else v for k, v in cols.items()}
                     | {"click": pa.array(click), "conversion": pa.array(click * (rng.random(n) < 0.3)),
                        "split": pa.array(np.where(np.arange(n) % 5 == 0, "valid", "train"))})
    write_deltalake(str(data_dir / "features"), table, partition_by=["split"])
    fields = [{"name": f, "group": g, "multi": False, "vocab_size": v} for f, (g, v) in FIELDS.items()]
    manifest = {"fields": fields, "dense_fields": [], "user_key_field": "101", "item_key_field": "205",
                "tables": {"features": {"path": "features", "format": "delta", "version": 0}}}
    (data_dir / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def built(spark, tmp_path_factory) -> dict:
    """Features -> pre-trained ctr model -> graph version 0."""
    root = tmp_path_factory.mktemp("graph")
    write_features(root / "data")
    cfg = GraphConfig(data=str(root / "data"), output=str(root / "graphs"), k=4, format="parquet",
                      pretrain=PretrainConfig(preset="fast", epochs=2, device="cpu"))
    first = run_graph(spark, cfg)
    return {"root": root, "cfg": cfg, "first": first}


def test_pretrain_run_and_manifest(built):
    first, cfg = built["first"], built["cfg"]
    run = Path(cfg.output) / "pretrain" / "features_v0"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["model"] == "ctr" and metrics["valid"]["ctr_auc"] > 0.6  # clusters are learnable
    assert first["graph_version"] == 0 and not first["skipped"]
    assert first["k"] == 4 and first["include_self"] and first["normalization"] == "sym"
    assert first["features"]["version"] == 0 and first["embedding"]["train_table_version"] == 0
    assert first["embedding"]["state_key"] == "embedding.table.weight"
    assert first["user"]["tables"]["graph"]["version"] == 0 and first["user"]["num_nodes"] == USERS + 1


def test_published_edges_match_recomputation(built):
    cfg = built["cfg"]
    graphs = load_structure_graphs(cfg.output, SPEC)
    emb = load_embeddings(Path(cfg.output) / "pretrain" / "features_v0", SPEC)
    for graph, group in zip(graphs, ("user", "item")):
        key = SPEC.user_key_field if group == "user" else SPEC.item_key_field
        assert graph.num_nodes == SPEC.sparse_vocab[SPEC.sparse_fields.index(key)]
        adj = graph.adj.to_dense().numpy()
        assert adj[0].sum() == 0  # OOV node: self-only (no stored row)
        rows = np.flatnonzero(adj.sum(1))
        assert ((adj > 0).sum(1)[rows] <= 4).all() and (np.diag(adj)[rows] > 0).all()  # self among the K
        assert graph.node_fields.shape[1] == len(graph_fields(SPEC, group))
    users = graphs[0].node_fields.numpy()
    np.testing.assert_array_equal(users[1:, 0], np.arange(1, USERS + 1))
    np.testing.assert_array_equal(users[1:, 1], np.arange(1, USERS + 1) % CLUSTERS + 1)  # modal cluster
    reps = representations(emb.table, SPEC, node_table_numpy(SPEC, "user", {
        "101": np.arange(1, USERS + 1), "121": users[1:, 1]}))
    z = reps[1:] / np.linalg.norm(reps[1:], axis=1, keepdims=True)
    u = 7
    top = set(np.argsort(-(z @ z[u - 1]))[:4] + 1)
    assert set(np.flatnonzero(graphs[0].adj.to_dense()[u].numpy())) == top


def test_refresh_skip_force_failure_and_pinning(spark, built, monkeypatch):
    cfg = built["cfg"]
    same = run_graph(spark, cfg)
    assert same["skipped"] and same["graph_version"] == 0  # unchanged inputs: nothing written
    forced = run_graph(spark, GraphConfig(**{**cfg.__dict__, "force": True}))
    assert forced["graph_version"] == 1 and forced["fingerprint"] == built["first"]["fingerprint"]
    assert forced["user"]["tables"]["graph"]["version"] == 1
    v0, v1 = load_structure_graphs(cfg.output, SPEC, 0), load_structure_graphs(cfg.output, SPEC)
    for a, b in zip(v0, v1):  # same inputs -> same edges
        assert torch.equal(a.adj.indices(), b.adj.indices()) and torch.equal(a.adj.values(), b.adj.values())

    real = store.write_table

    def failing(df, path, *args, **kwargs):
        if Path(path).name == "item_graph":
            raise OSError("injected failure while writing item_graph")
        return real(df, path, *args, **kwargs)

    monkeypatch.setattr(store, "write_table", failing)
    with pytest.raises(OSError, match="injected"):
        run_graph(spark, GraphConfig(**{**cfg.__dict__, "force": True, "k": 3}))
    manifest = read_manifest(cfg.output)
    assert manifest["current"] == 1 and sorted(manifest["versions"]) == ["0", "1"]
    user, item = load_structure_graphs(cfg.output, SPEC)  # the last good version, intact
    assert torch.equal(user.adj.values(), v1[0].adj.values()) and item.adj._nnz() == v1[1].adj._nnz()
    with pytest.raises(KeyError, match="no graph version 7"):
        load_structure_graphs(cfg.output, SPEC, 7)


def test_delta_tables_hold_the_same_graph(spark, built):
    cfg = built["cfg"]
    delta = GraphConfig(**{**cfg.__dict__, "format": "delta", "output": str(built["root"] / "delta"),
                           "ctr_checkpoint": str(Path(cfg.output) / "pretrain" / "features_v0")})
    entry = run_graph(spark, delta)
    assert entry["fingerprint"] == built["first"]["fingerprint"]  # same inputs, another store
    assert (Path(delta.output) / "item_graph" / "_delta_log").is_dir()
    assert entry["item"]["tables"]["graph"] == {"path": "item_graph", "format": "delta", "version": 0}
    for a, b in zip(load_structure_graphs(delta.output, SPEC), load_structure_graphs(cfg.output, SPEC, 0)):
        assert torch.equal(a.adj.indices(), b.adj.indices()) and torch.equal(a.adj.values(), b.adj.values())
        assert torch.equal(a.node_fields, b.node_fields)


def test_cstwa_trains_with_loaded_graphs(built):
    from cvr_spark.train.loader import FeatureLoader

    cfg = built["cfg"]
    torch.manual_seed(0)
    model = registry.build("cstwa", SPEC, registry.preset_options("cstwa", "fast"))
    model.set_graphs(*load_structure_graphs(cfg.output, SPEC, version=0))
    loader = FeatureLoader(cfg.data, "train", 128, spec=SPEC, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    before = model.cvr_embedding.table.weight.detach().clone()
    for step, batch in enumerate(loader):
        out = model(batch)
        terms = model.loss(batch, out)
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
        model.on_train_batch_end(batch, out)
        assert torch.isfinite(terms["total"])
        if step == 3:
            break
    assert not torch.equal(before, model.cvr_embedding.table.weight)


def test_bad_inputs(built, tmp_path):
    cfg = built["cfg"]
    with pytest.raises(ValueError, match="graph.k"):
        GraphConfig(data="d", output="o", k=0).check()
    save_checkpoint(tmp_path / "x.pt", {"model": {"w": torch.zeros(2)}})
    with pytest.raises(KeyError, match="EmbeddingArch table"):
        load_embeddings(tmp_path / "x.pt", SPEC)
    save_checkpoint(tmp_path / "y.pt", {"model": {"emb.table.weight": torch.zeros(5, 2)}})
    with pytest.raises(ValueError, match="expected \\[.*, D\\]"):
        load_embeddings(tmp_path / "y.pt", SPEC)
    other = FeatureSpec(sparse_fields=SPEC.sparse_fields, sparse_vocab=(50, *SPEC.sparse_vocab[1:]),
                        groups=SPEC.groups)
    with pytest.raises(ValueError, match="rebuild the graph"):
        load_structure_graphs(cfg.output, other)
    with pytest.raises(FileNotFoundError, match="no graph published"):
        load_structure_graphs(tmp_path, SPEC)


def test_cli_flags_and_overrides():
    import argparse

    parser = argparse.ArgumentParser()
    graph_job.add_graph_arguments(parser)
    args = parser.parse_args(["--data", "d", "--ctr-checkpoint", "runs/ctr", "--k", "5", "--output", "o",
                              "--config", "conf/graph.yaml", "graph.include_self=false"])
    cfg = graph_job.config_from_args(args).graph
    assert (cfg.data, cfg.ctr_checkpoint, cfg.k, cfg.output, cfg.include_self) == ("d", "runs/ctr", 5, "o", False)
    args = parser.parse_args(["--data", "d", "--pretrain", "--output", "o"])
    assert graph_job.config_from_args(args).graph.ctr_checkpoint == ""
    with pytest.raises(SystemExit):
        parser.parse_args(["--pretrain", "--ctr-checkpoint", "x"])


def test_experiment_pins_the_graph_version_for_training_and_evaluation(built, tmp_path):
    """run_train -> CSTWA reads the graph job's output; the run records the version it read."""
    from cvr_spark.train.experiment import evaluate_run, run_train

    import shutil

    from deltalake import DeltaTable

    cfg = built["cfg"]
    current = read_manifest(cfg.output)["current"]
    # run_train evaluates on test: a copy of the features with the valid rows also as test
    data = tmp_path / "data"
    shutil.copytree(cfg.data, data)
    valid = DeltaTable(str(data / "features")).to_pyarrow_table(filters=[("split", "=", "valid")])
    test = valid.set_column(valid.schema.get_field_index("split"), "split",
                            pa.array(["test"] * valid.num_rows))
    write_deltalake(str(data / "features"), test, partition_by=["split"], mode="append")
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["tables"]["features"]["version"] = 1
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FileNotFoundError, match="no graph published"):
        run_train(data, ["cstwa"], [1], "fast", 1, 1, tmp_path / "none", use_gpu=False,
                  graph_dir=tmp_path / "empty")
    overrides = ["train.progress=false", "train.num_threads=1", "model.batch_size=128"]
    result = run_train(data, ["cstwa"], [1], "fast", 1, 1, tmp_path / "runs", overrides,
                       use_gpu=False, graph_dir=cfg.output)
    run_dir = Path(result["runs"][0]["run_dir"])
    job = json.loads((run_dir / "config.json").read_text())["job"]
    assert job["graph_dir"] == str(Path(cfg.output).resolve()) and job["graph_version"] == current
    assert 0 <= result["runs"][0]["metrics"]["ctr_auc"] <= 1
    # evaluation of the same run reads the same pinned graphs: same metrics
    again = evaluate_run(run_dir, data, "test", device="cpu")
    assert again["metrics"]["ctr_auc"] == pytest.approx(result["runs"][0]["metrics"]["ctr_auc"], abs=1e-12)
