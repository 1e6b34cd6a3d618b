# Databricks notebook source
# MAGIC %md
# MAGIC # Simulate: raw Ali-CCP files with a known truth
# MAGIC
# MAGIC Writes the four raw Ali-CCP files and the `truth` table under `output`
# MAGIC (`cvr_spark.data.simulator.simulate`). Needs the cvr-spark wheel on the cluster
# MAGIC (the bundle's job tasks attach it). Use a Unity Catalog volume path (`/Volumes/...`):
# MAGIC Spark and the trainer's pyarrow reader both see it.

# COMMAND ----------

dbutils.widgets.text("output", "/Volumes/main/cvr/data/sim", "output folder")
dbutils.widgets.text("rows", "1000000", "rows")
dbutils.widgets.text("seed", "7", "seed")
dbutils.widgets.dropdown("preset", "default", ["default", "small"], "preset")
dbutils.widgets.text("config", "../conf/simulate.yaml", "YAML config (empty: none)")
dbutils.widgets.text("overrides", "", "dotted overrides, space-separated")

# COMMAND ----------

from cvr_spark.config import load_config

files = [f for f in [dbutils.widgets.get("config").strip()] if f]
flags = {k: dbutils.widgets.get(k).strip() for k in ("output", "rows", "seed", "preset")}
overrides = [f"simulate.{k}={v}" for k, v in flags.items() if v] + dbutils.widgets.get("overrides").split()
cfg = load_config(files, overrides)

# COMMAND ----------

import json

from cvr_spark.data.simulator import simulate
from cvr_spark.spark import get_spark

summary = simulate(get_spark(cfg.spark), cfg.simulate)
print(json.dumps(summary, indent=2, default=str))
