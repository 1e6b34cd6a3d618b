"""Config: defaults, YAML files, dotted overrides, and errors that name the key."""
from __future__ import annotations

import dataclasses

import pytest

from cvr_spark.config import Config, ConfigError, SparkConfig, load_config, to_dict


def test_defaults_and_overrides(tmp_path):
    f = tmp_path / "a.yaml"
    f.write_text("features:\n  min_count: 3\n  format: parquet\nspark:\n  master: local[1]\n")
    cfg = load_config([f], ["features.min_count=7", "simulate.rows=123"])
    assert isinstance(cfg, Config)
    assert cfg.features.min_count == 7  # override beats file
    assert cfg.features.format == "parquet"  # file beats default
    assert cfg.spark.master == "local[1]"
    assert cfg.simulate.rows == 123
    assert cfg.features.valid_fraction == 0.1  # default kept
    assert to_dict(cfg)["features"]["min_count"] == 7


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("features:\n  min_cuont: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config([f])
    assert "min_cuont" in str(e.value) and "bad.yaml" in str(e.value)


def test_unknown_override_and_bad_type():
    with pytest.raises(ConfigError, match="features.bogus"):
        load_config([], ["features.bogus=1"])
    with pytest.raises(ConfigError, match="min_count"):
        load_config([], ["features.min_count=ten"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config([], ["features.min_count"])


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config(["nope/missing.yaml"])


def test_repo_conf_files_load():
    from cvr_spark.config import CONF_DIR

    from cvr_spark.graph.job import GraphJobConfig
    from cvr_spark.score import ScoreJobConfig

    # Each job reads its own schema; train.yaml holds run_train overrides (test_bundle.py).
    schemas = {"graph.yaml": GraphJobConfig, "score.yaml": ScoreJobConfig, "train.yaml": None}
    files = sorted(CONF_DIR.glob("*.yaml"))
    assert files, "conf/ has example configs"
    for f in files:
        schema = schemas.get(f.name, Config)
        if schema is not None:
            load_config([f], schema=schema)


def test_local_java_options_initial_heap_from_driver_memory():
    from cvr_spark.spark import local_java_options

    base = SparkConfig(jvm_options="-XX:+UseParallelGC")
    for memory, xms in [("4g", "-Xms4g"), ("512M", "-Xms512m"), ("6gb", "-Xms6g"), ("4096", "-Xms4096m")]:
        opts = local_java_options(dataclasses.replace(base, driver_memory=memory))
        assert opts == f"-XX:+UseParallelGC {xms}", memory
    assert local_java_options(dataclasses.replace(base, fixed_heap=False)) == "-XX:+UseParallelGC"
    assert local_java_options(SparkConfig(jvm_options="", driver_memory="1g")) == "-Xms1g"
    for bad in ("4 gigs", "4 g", "4096b"):  # Spark rejects a space; a bare b means bytes, not MiB
        with pytest.raises(ValueError, match=f"spark.driver_memory '{bad}'"):
            local_java_options(dataclasses.replace(base, driver_memory=bad))
    # the default options keep the huge-method JIT flag (the parse's generated code needs it)
    assert "-XX:-DontCompileHugeMethods" in local_java_options(SparkConfig())
