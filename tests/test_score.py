"""Batch scoring: a tiny run trained on the AITM CSV sample, scored in Spark, checked against
the in-process ``predict`` on the same rows; raw inputs encoded with the stored vocabulary."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

TRAIN_OVERRIDES = {"train": {"progress": False, "num_threads": 1, "patience": 0}, "model": {"batch_size": 16}}


def _clean_copy(src: Path, dst: Path) -> Path:
    """The sample without its conversion-without-click rows: the features job's rejects write
    currently fails on aitm-csv rejects (the reader's ``line`` holds the raw text, the writer
    casts it to long); scoring does not depend on rejects."""
    dst.mkdir(parents=True)
    for name in ("train.csv", "test.csv"):
        lines = (src / name).read_text().splitlines(keepends=True)
        (dst / name).write_text("".join(line for line in lines if not line.startswith("0,1,")))
    return dst


@pytest.fixture(scope="module")
def trained(spark, shared_fixtures, tmp_path_factory):
    from cvr_spark.data.features import FeaturesConfig, run_features
    from cvr_spark.train.experiment import run_train

    root = tmp_path_factory.mktemp("score")
    raw = _clean_copy(shared_fixtures / "PaddleRec" / "aitm", root / "raw")
    data = root / "data"
    run_features(spark, FeaturesConfig(source="aitm-csv", input=str(raw), output=str(data), min_count=2,
                                       valid_fraction=0.3, rows_per_file=1000))
    run_train(data, ["esmm"], [1], "fast", 1, 1, root / "runs", TRAIN_OVERRIDES, use_gpu=False)
    return {"root": root, "raw": raw, "data": data, "run": root / "runs" / "esmm" / "seed1"}


def _in_process_predict(run: Path, data: Path) -> dict:
    from cvr_spark.score import build_model, scoring_payload
    from cvr_spark.train.loader import FeatureLoader
    from cvr_spark.train.loop import predict

    model = build_model(scoring_payload(run))
    loader = FeatureLoader(str(data), "test", 7, shuffle=False, spec=model.spec)
    return predict(model, loader)


def _by_id(rows) -> dict[int, tuple]:
    return {int(r["sample_id"]): (r["p_ctr"], r["p_cvr"], r["p_ctcvr"]) for r in rows}


def test_score_table_matches_predict_and_versions(spark, trained):
    from delta.tables import DeltaTable

    from cvr_spark.score import score_table
    from cvr_spark.tables import read_table

    out = trained["root"] / "predictions"
    first = score_table(spark, trained["run"], trained["data"], split="test", output=out)
    assert first["version"] == 0 and first["columns"] == ["sample_id", "p_ctr", "p_cvr", "p_ctcvr"]
    table = read_table(spark, str(out), "delta")
    assert table.columns == first["columns"]
    features = read_table(spark, str(trained["data"] / "features")).where("split = 'test'")
    ids = sorted(int(r["sample_id"]) for r in features.select("sample_id").collect())
    got = _by_id(table.collect())
    assert sorted(got) == ids and first["rows"] == len(ids) > 0  # one row per input row

    ref = _in_process_predict(trained["run"], trained["data"])
    assert sorted(ref["sample_id"].tolist()) == ids
    for key, col in (("p_ctr", 0), ("p_cvr", 1), ("p_ctcvr", 2)):
        mine = np.array([got[int(s)][col] for s in ref["sample_id"]])
        np.testing.assert_allclose(mine, ref[key], rtol=1e-5, atol=1e-7)
    assert np.ptp(ref["p_ctr"]) > 0, "predictions should depend on the row"

    second = score_table(spark, trained["run"] / "checkpoint.pt", trained["data"], split="test", output=out)
    assert second["version"] == 1 and second["rows"] == first["rows"]
    meta = json.loads(DeltaTable.forPath(spark, str(out)).history(1).first()["userMetadata"])
    assert meta["model"] == "esmm" and meta["input"]["split"] == "test" and meta["input"]["version"] == 0


def test_encode_raw_maps_unseen_and_missing_ids_to_zero(spark, trained):
    from pyspark.sql import functions as F

    from cvr_spark.data.fields import AITM18
    from cvr_spark.data.sources import read_source
    from cvr_spark.score import encode_raw
    from cvr_spark.tables import read_table

    raw = read_source(spark, "aitm-csv", str(trained["raw"])).train
    extra = raw.limit(1).withColumn("sample_id", F.lit(-5).cast("long"))
    extra = extra.withColumn("101", F.lit("never-seen-user")).withColumn("205", F.lit(None).cast("string"))
    frame = raw.unionByName(extra)
    encoded = {int(r["sample_id"]): r for r in encode_raw(spark, frame, trained["data"]).collect()}
    vocab = {(r["field"], r["raw_id"]): r["index"] for r in read_table(spark, str(trained["data"] / "vocab")).collect()}
    assert encoded[-5]["101"] == 0 and encoded[-5]["205"] == 0
    checked = 0
    for r in frame.collect():
        for f in AITM18:
            want = vocab.get((f, r[f]), 0) if r[f] is not None else 0
            assert encoded[int(r["sample_id"])][f] == want, (r["sample_id"], f, r[f])
            checked += want > 0
    assert checked > 0, "some ids are kept by the vocabulary (min_count=2)"


def test_raw_input_scores_like_the_encoded_features(spark, trained):
    from cvr_spark.data.sources import read_source
    from cvr_spark.score import score_table
    from cvr_spark.tables import read_table

    raw_test = read_source(spark, "aitm-csv", str(trained["raw"])).test
    res = score_table(spark, trained["run"], trained["data"], input_table=raw_test, raw=True,
                      output=trained["root"] / "raw_predictions", fmt="parquet")
    assert res["format"] == "parquet" and res["version"] == 0
    raw_pred = _by_id(read_table(spark, res["output"], "parquet").collect())
    ref = _in_process_predict(trained["run"], trained["data"])
    assert sorted(raw_pred) == sorted(ref["sample_id"].tolist())
    mine = np.array([raw_pred[int(s)][0] for s in ref["sample_id"]])
    np.testing.assert_allclose(mine, ref["p_ctr"], rtol=1e-5, atol=1e-7)


def test_bad_inputs_are_clear_errors(spark, trained, tmp_path):
    from cvr_spark.score import score_table

    features = trained["data"] / "features"
    with pytest.raises(KeyError, match=r"lacks column\(s\) \['101'\]"):
        from cvr_spark.tables import read_table

        df = read_table(spark, str(features)).drop("101")
        score_table(spark, trained["run"], trained["data"], input_table=df, output=tmp_path / "p")
    with pytest.raises(ValueError, match="has no 'split' column"):
        df = read_table(spark, str(features)).drop("split")
        score_table(spark, trained["run"], trained["data"], input_table=df, split="test", output=tmp_path / "p")
    other = tmp_path / "other"
    other.mkdir()
    manifest = json.loads((trained["data"] / "manifest.json").read_text())
    manifest["fields"][0]["vocab_size"] += 1
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="'sparse_vocab' is .* but the run was trained with"):
        score_table(spark, trained["run"], other)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        score_table(spark, tmp_path, trained["data"])


def test_score_config_file_flags_and_overrides():
    import argparse

    from cvr_spark.config import REPO_ROOT, ConfigError
    from cvr_spark.score import add_score_arguments, config_from_args, load_score_config

    cfg = load_score_config([REPO_ROOT / "conf" / "score.yaml"])
    assert cfg.score.format == "delta" and cfg.score.batch_size > 0
    parser = argparse.ArgumentParser()
    add_score_arguments(parser)
    args = parser.parse_args(["--run", "r/esmm/seed1", "--data", "out/d", "--split", "test", "--raw",
                              "--config", str(REPO_ROOT / "conf" / "score.yaml"), "score.batch_size=128"])
    job = config_from_args(args)
    assert (job.score.run, job.score.data, job.score.split, job.score.raw, job.score.batch_size) == (
        "r/esmm/seed1", "out/d", "test", True, 128)
    with pytest.raises(ConfigError, match="score.batch_sise"):
        load_score_config([], ["score.batch_sise=3"])
    job.score.format = "csv"
    with pytest.raises(ValueError, match="score.format must be one of"):
        job.score.check()
