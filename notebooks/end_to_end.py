# Databricks notebook source
# MAGIC %md
# MAGIC # End to end: simulate -> features -> train -> report -> score
# MAGIC
# MAGIC The embedded default of `cvr-spark demo` (`cvr_spark.demo.run_demo`: simulator `small`
# MAGIC preset, model presets `fast`, one seed; stages whose output exists are reused unless
# MAGIC `rebuild=true`), then the first model's run scores the test split
# MAGIC (`cvr_spark.score.score_table`). For the production path run the stage notebooks
# MAGIC (or the bundle's jobs) instead. The graph stage needs FAISS on the cluster: the wheel does
# MAGIC not bring it; add `faiss-cpu` (or `faiss-gpu-cu12` on a GPU cluster) as a cluster library.

# COMMAND ----------

dbutils.widgets.text("root", "/Volumes/main/cvr/data/demo", "output root")
dbutils.widgets.text("rows", "200000", "simulated rows")
dbutils.widgets.text("models", "esmm,aitm,escm2_ipw,cstwa,esmm+ctnocvr,chorus", "models (comma-separated)")
dbutils.widgets.dropdown("rebuild", "false", ["false", "true"], "rebuild every stage")
dbutils.widgets.text("overrides", "", "dotted overrides, space-separated")

# COMMAND ----------

from cvr_spark.config import load_config

cfg = load_config([], dbutils.widgets.get("overrides").split())
models = [m.strip() for m in dbutils.widgets.get("models").split(",") if m.strip()]

# COMMAND ----------

from cvr_spark.demo import run_demo

built = run_demo(cfg, out_dir=dbutils.widgets.get("root"), rows=int(dbutils.widgets.get("rows")),
                 rebuild=dbutils.widgets.get("rebuild") == "true", models=models)

# COMMAND ----------

import json

from cvr_spark.score import score_table
from cvr_spark.spark import get_spark

run_dir = built["train"]["runs"][0]["run_dir"]
scored = score_table(get_spark(cfg.spark), run_dir, built["features"], split="test",
                     output=f"{dbutils.widgets.get('root')}/predictions")
print(json.dumps(scored, indent=2, default=str))
