"""Table paths given as URIs (``file://``, ``s3://`` ...): joined as text, versions recorded, the
manifest written where the tables are."""
from __future__ import annotations

import json
from pathlib import Path

from cvr_spark import tables


def test_paths_keep_the_uri_scheme():
    assert tables.join("s3://bucket/x", "features") == "s3://bucket/x/features"
    assert tables.join("hdfs://nn:8020/a/", "b", "c") == "hdfs://nn:8020/a/b/c"
    assert tables.local_path("file:///tmp/x") == "/tmp/x"
    assert tables.local_path("file:/tmp/x") == "/tmp/x"
    assert tables.local_path("relative/x") == "relative/x"
    assert tables.local_path("s3://bucket/x") is None and tables.local_path("dbfs:/x") is None


def test_hadoop_file_system_writes_replace_and_read_back(spark, tmp_path):
    """The remote-path branch (Spark's Hadoop file system), exercised on a file:// URI."""
    uri = f"file://{tmp_path}/sub/_latest"
    tables._hadoop_write_text(spark, uri, "3")
    tables._hadoop_write_text(spark, uri, "4")  # replaces the old file
    assert (tmp_path / "sub" / "_latest").read_text() == "4"
    assert [p.name for p in (tmp_path / "sub").iterdir() if not p.name.endswith(".crc")] == ["_latest"]
    fs, path = tables._hadoop_fs(spark, uri)
    assert fs.exists(path)


def test_feature_job_into_a_file_uri_records_versions_and_its_manifest(spark, shared_fixtures, tmp_path,
                                                                       monkeypatch):
    from cvr_spark.data.features import FeaturesConfig, run_features

    monkeypatch.chdir(tmp_path)  # a manifest written to a mangled relative path would land here
    out = tmp_path / "out"
    for fmt in ("delta", "parquet"):
        cfg = FeaturesConfig(source="aitm-csv", input=str(shared_fixtures / "ddpo-paddle" / "train.csv"),
                             output=f"file://{out / fmt}", format=fmt, min_count=2)
        manifest = run_features(spark, cfg)
        assert {t["version"] for t in manifest["tables"].values()} == {0}, fmt  # was None for URIs
        assert json.loads((out / fmt / "manifest.json").read_text())["tables"] == manifest["tables"]
        assert manifest["fields_preset"] is None  # a CSV source: its own columns, not features.fields
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "parquet" / "features" / "_latest").read_text() == "0"
    assert Path(out / "delta" / "features" / "_delta_log").is_dir()
