"""The causal simulator: raw Ali-CCP files in the exact format, truth table, calibrated rates,
determinism, and the direction of its knobs (selection bias, click-bait vs daily needs)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from cvr_spark.data import simulator_world as W
from cvr_spark.data.fields import MULTI_VALUED_FIELDS, USER_FIELDS
from cvr_spark.data.simulator import (
    SimulateConfig, _merge_local, preset_config, simulate, simulate_frame)
from cvr_spark.tables import read_table

RAW_FILES = ["common_features_test.csv", "common_features_train.csv",
             "sample_skeleton_test.csv", "sample_skeleton_train.csv"]
SMALL = dict(rows=20_000, users=2_000, items=4_000)


def _features(feature_list: str) -> list[tuple[str, int, str]]:
    out = []
    for feat in feature_list.split("\x01"):
        field, rest = feat.split("\x02")
        fid, value = rest.split("\x03")
        out.append((field, int(fid), value))
    return out


def _read_skeleton(path: Path) -> list[tuple[int, int, int, str, list]]:
    rows = []
    for line in path.read_text().splitlines():
        sid, click, buy, key, count, flist = line.split(",")
        feats = _features(flist)
        assert int(count) == len(feats), line
        rows.append((int(sid), int(click), int(buy), key, feats))
    return rows


def _read_common(path: Path) -> dict[str, list]:
    out = {}
    for line in path.read_text().splitlines():
        key, count, flist = line.split(",")
        feats = _features(flist)
        assert int(count) == len(feats) and key not in out, line
        out[key] = feats
    return out


@pytest.fixture(scope="module")
def default_run(spark, tmp_path_factory):
    out = tmp_path_factory.mktemp("sim_default")
    return simulate(spark, preset_config("default", output=str(out), rows=40_000)), out


@pytest.fixture(scope="module")
def small_run(spark, tmp_path_factory):
    out = tmp_path_factory.mktemp("sim_small")
    cfg = preset_config("small", output=str(out), truth_format="parquet", **SMALL)
    return simulate(spark, cfg), out, cfg


def test_raw_files_exact_format(default_run):
    summary, out = default_run
    assert sorted(os.listdir(out)) == sorted(RAW_FILES + ["truth"])
    skeleton_fields = set(W.SKELETON_FIELDS)
    user_fields = set(USER_FIELDS) | set(MULTI_VALUED_FIELDS)
    field_of_id: dict[int, str] = {}
    for split in ("train", "test"):
        common = _read_common(out / f"common_features_{split}.csv")
        skeleton = _read_skeleton(out / f"sample_skeleton_{split}.csv")
        assert len(skeleton) == summary["rows"][split] > 0
        assert [r[0] for r in skeleton] == sorted(r[0] for r in skeleton)
        for sid, click, buy, key, feats in skeleton:
            assert click in (0, 1) and buy in (0, click) and key in common
            names = [f for f, _, _ in feats]
            assert set(names) <= skeleton_fields and len(names) == len(set(names))
            assert "205" in names and "301" in names
        for feats in common.values():
            names = [f for f, _, _ in feats]
            assert set(names) <= user_fields and names.count("101") == 1
        every = [f for r in skeleton for f in r[4]] + [f for fs in common.values() for f in fs]
        for field, fid, value in every:
            assert value == "1.0"
            assert field_of_id.setdefault(fid, field) == field, f"feature id {fid} in {field} and {field_of_id[fid]}"
    assert {f for f in field_of_id.values()} >= set(MULTI_VALUED_FIELDS) | {"121", "129", "508", "853"}


def test_sparsity_drops_optional_fields(default_run):
    _, out = default_run
    skeleton = _read_skeleton(out / "sample_skeleton_train.csv")
    missing = sum("216" not in {f for f, _, _ in r[4]} for r in skeleton) / len(skeleton)
    assert 0.02 < missing < 0.09  # sparsity 0.05 per item


def test_default_rates_near_knobs(spark, default_run):
    summary, _ = default_run
    cfg = summary["config"]
    rates = [summary["rates"][s] for s in ("train", "test")]
    clicks = sum(r["clicks"] for r in rates)
    assert clicks / 40_000 == pytest.approx(cfg["ctr_level"], rel=0.12)
    truth = read_table(spark, summary["truth"]["path"])
    agg = truth.agg(F.sum(F.col("p_ctr") * F.col("p_cvr")) / F.sum("p_ctr"),
                    F.sum(F.col("p_ctr") * F.col("potential_conversion")) / F.sum("p_ctr")).first()
    assert agg[0] == pytest.approx(cfg["cvr_level"], rel=0.03)  # calibrated intercepts
    assert agg[1] == pytest.approx(cfg["cvr_level"], rel=0.5)   # realised draws (few events)


def test_small_rates_and_truth_table(spark, small_run):
    summary, out, cfg = small_run
    assert summary["truth"]["format"] == "parquet"
    clicks = sum(summary["rates"][s]["clicks"] for s in ("train", "test"))
    buys = sum(summary["rates"][s]["conversions"] for s in ("train", "test"))
    assert clicks / cfg.rows == pytest.approx(cfg.ctr_level, rel=0.08)
    assert buys / clicks == pytest.approx(cfg.cvr_level, rel=0.2)
    truth = read_table(spark, summary["truth"]["path"], "parquet").toPandas().set_index("sample_id")
    assert sorted(truth.columns) == sorted(["p_ctr", "p_cvr", "potential_conversion", "split"])
    assert truth.index.is_unique and len(truth) == cfg.rows
    for split in ("train", "test"):
        lines = _read_skeleton(out / f"sample_skeleton_{split}.csv")
        t = truth.loc[[r[0] for r in lines]]
        assert (t["split"] == split).all()
        clicks_s = [r[1] for r in lines]
        assert [r[2] for r in lines] == [c * p for c, p in zip(clicks_s, t["potential_conversion"])]
    assert truth["potential_conversion"].sum() > buys  # unclicked exposures convert too


def test_same_seed_same_files_other_seed_differs(spark, small_run, tmp_path):
    _, out, cfg = small_run
    again = tmp_path / "again"
    simulate(spark, SimulateConfig(**{**cfg.__dict__, "output": str(again)}))
    for name in RAW_FILES:
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    t1 = read_table(spark, str(out / "truth"), "parquet").toPandas().sort_values("sample_id")
    t2 = read_table(spark, str(again / "truth"), "parquet").toPandas().sort_values("sample_id")
    assert t1.reset_index(drop=True).equals(t2.reset_index(drop=True))
    other, _ = simulate_frame(spark, preset_config("small", seed=cfg.seed + 1, **SMALL))
    p_other = other.orderBy("sample_id").select("p_ctr").limit(200).toPandas()["p_ctr"].to_numpy()
    assert (p_other != t1["p_ctr"].to_numpy()[:200]).mean() > 0.9


def test_selection_bias_raises_click_conversion_correlation(spark):
    corr = {}
    for sb in (0.0, 2.0):
        frame, _ = simulate_frame(spark, preset_config("small", selection_bias=sb, **SMALL))
        corr[sb] = frame.agg(F.corr("click", "potential_conversion")).first()[0]
    assert corr[2.0] > corr[0.0] + 0.03, corr


def test_bait_items_click_more_and_convert_less_than_daily_needs(spark):
    cfg = preset_config("small", bait_fraction=0.2, daily_need_fraction=0.2, **SMALL)
    frame, _ = simulate_frame(spark, cfg)
    rows = frame.groupBy("item_type").agg(
        F.mean("click").alias("ctr"), F.mean("p_cvr").alias("p_cvr"),
        (F.sum("buy") / F.sum("click")).alias("cvr_clicked")).collect()
    by = {r["item_type"]: r for r in rows}
    bait, daily = by[W.ITEM_BAIT], by[W.ITEM_DAILY_NEED]
    assert bait["ctr"] > 1.5 * daily["ctr"]
    assert bait["p_cvr"] < 0.5 * daily["p_cvr"] and bait["cvr_clicked"] < daily["cvr_clicked"]


def test_presets_and_bad_knobs(tmp_path, spark):
    cfg = SimulateConfig(preset="small", rows=10).resolved()
    assert cfg.rows == 10 and cfg.ctr_level == 0.10 and cfg.users == 3_000
    assert preset_config("default").ctr_level == 0.04
    with pytest.raises(ValueError, match="simulate.preset"):
        preset_config("huge")
    with pytest.raises(ValueError, match="simulate.ctr_level"):
        preset_config("small", ctr_level=1.5)
    with pytest.raises(ValueError, match="bogus"):
        preset_config("small", bogus=1)
    with pytest.raises(ValueError, match="simulate.output"):
        simulate(spark, preset_config("small", rows=10))


def test_merge_local_concatenates_parts_in_order(tmp_path):
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "part-00001.txt").write_text("b\n")
    (parts / "part-00000.txt").write_text("a\n")
    (parts / "_SUCCESS").write_text("")
    _merge_local(str(parts), str(tmp_path / "out.csv"))
    assert (tmp_path / "out.csv").read_text() == "a\nb\n"
    _merge_local(str(tmp_path / "absent"), str(tmp_path / "empty.csv"))
    assert (tmp_path / "empty.csv").read_text() == ""


def test_demo_simulation_takes_every_simulate_override():
    from cvr_spark.config import load_config
    from cvr_spark.demo import DEMO_ROWS, demo_simulation

    sim = demo_simulation(load_config([], ["simulate.selection_bias=1.0", "simulate.seed=3"]), "/x")
    small = preset_config("small")
    assert (sim.preset, sim.selection_bias, sim.seed, sim.rows, sim.output) == ("small", 1.0, 3, DEMO_ROWS, "/x")
    assert sim.users == small.users and sim.ctr_level == small.ctr_level
    sim = demo_simulation(load_config([], ["simulate.rows=5000", "simulate.users=77"]), "/x", preset="default")
    assert (sim.preset, sim.rows, sim.users, sim.ctr_level) == ("default", 5000, 77, 0.04)
    assert demo_simulation(load_config([], ["simulate.rows=5000"]), "/x", rows=900).rows == 900


def test_feature_job_registers_the_simulators_truth_table(spark, default_run, small_run, tmp_path):
    from cvr_spark.data.features import FeaturesConfig, simulator_truth

    for (_, out, *_), fmt in ((default_run, "delta"), (small_run, "parquet")):
        entry = simulator_truth(spark, FeaturesConfig(source="aliccp-raw", input=str(out), output="o"))
        assert entry == {"path": f"{out.resolve()}/truth", "format": fmt, "version": 0}
    out = default_run[1]
    assert simulator_truth(spark, FeaturesConfig(source="aitm-csv", input=str(out), output="o")) is None
    other = FeaturesConfig(source="aliccp-raw", input=str(out), output="o", test_input=str(tmp_path))
    assert simulator_truth(spark, other) is None  # the test ids come from another folder
    assert simulator_truth(spark, FeaturesConfig(source="aliccp-raw", input=str(tmp_path), output="o")) is None


def test_simulator_stores_its_frame_deserialized(spark, tmp_path, monkeypatch):
    """The simulator's one stored frame uses the JVM's deserialized level (PySpark's
    MEMORY_AND_DISK would serialize every row)."""
    from pyspark import StorageLevel

    frame_class = type(spark.range(1))  # the session's DataFrame class (classic or Connect)
    levels, persist = [], frame_class.persist

    def spy(self, storageLevel=StorageLevel.MEMORY_AND_DISK_DESER):
        levels.append(storageLevel)
        return persist(self, storageLevel)

    monkeypatch.setattr(frame_class, "persist", spy)
    simulate(spark, preset_config("small", output=str(tmp_path / "sim"), **{**SMALL, "rows": 2000}))
    assert levels and all(level == StorageLevel.MEMORY_AND_DISK_DESER for level in levels), levels
