# Databricks notebook source
# MAGIC %md
# MAGIC # Score: a trained run over a table -> `predictions` (new Delta version)
# MAGIC
# MAGIC `cvr_spark.score.run_score`: the run's best weights are broadcast once, rebuilt once per
# MAGIC Python worker and applied with `mapInPandas`; `predictions` holds `sample_id`, `p_ctr`,
# MAGIC `p_cvr`, `p_ctcvr`. `input_table` (a path or catalog table) scores another table with the
# MAGIC same fields; `raw=true` encodes raw string ids with the stored vocabulary first (unseen -> 0).

# COMMAND ----------

dbutils.widgets.text("run", "/Volumes/main/cvr/data/runs/esmm/seed1", "run folder or checkpoint")
dbutils.widgets.text("data", "/Volumes/main/cvr/data/features", "feature job output")
dbutils.widgets.text("split", "test", "split (empty: every row)")
dbutils.widgets.text("output", "/Volumes/main/cvr/data/predictions", "predictions table (empty: <run>/predictions)")
dbutils.widgets.dropdown("format", "delta", ["delta", "parquet"], "table format")
dbutils.widgets.text("input_table", "", "table to score (empty: the features table)")
dbutils.widgets.dropdown("raw", "false", ["false", "true"], "input has raw ids")
dbutils.widgets.text("config", "../conf/score.yaml", "YAML config (empty: none)")
dbutils.widgets.text("overrides", "", "dotted overrides, space-separated")

# COMMAND ----------

from cvr_spark.score import load_score_config

files = [f for f in [dbutils.widgets.get("config").strip()] if f]
flags = {k: dbutils.widgets.get(k).strip() for k in ("run", "data", "split", "output", "format", "input_table", "raw")}
overrides = [f"score.{k}={v}" for k, v in flags.items() if v] + dbutils.widgets.get("overrides").split()
cfg = load_score_config(files, overrides)

# COMMAND ----------

import json

from cvr_spark.score import run_score
from cvr_spark.spark import get_spark

result = run_score(get_spark(cfg.spark), cfg.score)
print(json.dumps(result, indent=2, default=str))
