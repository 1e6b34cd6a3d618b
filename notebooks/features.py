# Databricks notebook source
# MAGIC %md
# MAGIC # Features: raw input -> vocab, features, rejects + manifest.json
# MAGIC
# MAGIC `cvr_spark.data.features.run_features`: vocabularies from the train input only
# MAGIC (`min_count`), encoded int fields, labels, train / valid / test split, evenly sized files,
# MAGIC Delta tables (each run a new version) and, last, `manifest.json` under `output`.

# COMMAND ----------

dbutils.widgets.dropdown("source", "aliccp-raw",
                         ["aliccp-raw", "aitm-csv", "rechub-csv", "paddle-joined", "aliexpress-csv"], "source")
dbutils.widgets.text("input", "/Volumes/main/cvr/data/sim", "input file or folder")
dbutils.widgets.text("output", "/Volumes/main/cvr/data/features", "output folder")
dbutils.widgets.dropdown("fields", "aitm18", ["aitm18", "full"], "field preset")
dbutils.widgets.text("min_count", "10", "min_count")
dbutils.widgets.dropdown("format", "delta", ["delta", "parquet"], "table format")
dbutils.widgets.text("config", "../conf/features.yaml", "YAML config (empty: none)")
dbutils.widgets.text("overrides", "", "dotted overrides, space-separated")

# COMMAND ----------

from cvr_spark.config import load_config

files = [f for f in [dbutils.widgets.get("config").strip()] if f]
flags = {k: dbutils.widgets.get(k).strip() for k in ("source", "input", "output", "fields", "min_count", "format")}
overrides = [f"features.{k}={v}" for k, v in flags.items() if v] + dbutils.widgets.get("overrides").split()
cfg = load_config(files, overrides)

# COMMAND ----------

from cvr_spark.data.features import run_features
from cvr_spark.demo import summarize_manifest
from cvr_spark.spark import get_spark

manifest = run_features(get_spark(cfg.spark), cfg.features)
print(summarize_manifest(manifest))
