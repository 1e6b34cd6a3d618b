# Databricks notebook source
# MAGIC %md
# MAGIC # Graph refresh: user/user and item/item similarity graphs (CSTWA)
# MAGIC
# MAGIC `cvr_spark.graph.job.run_graph`: CTR embeddings (from `ctr_checkpoint`, or a CTR model
# MAGIC pre-trained here when it is empty) -> FAISS exact cosine top-K (on a GPU when present) ->
# MAGIC sparsified, normalised `user_graph` / `item_graph` published as new table versions under
# MAGIC `output`. Unchanged inputs keep the current version; a failed refresh leaves it current.
# MAGIC The bundle's `graph_refresh` job runs this notebook daily. FAISS is not in the wheel: the
# MAGIC bundle's graph tasks install `faiss-gpu-cu12`; elsewhere add `faiss-cpu` as a cluster library.

# COMMAND ----------

dbutils.widgets.text("data", "/Volumes/main/cvr/data/features", "feature job output")
dbutils.widgets.text("output", "/Volumes/main/cvr/data/features/graphs", "graph folder (training reads <data>/graphs)")
dbutils.widgets.text("ctr_checkpoint", "", "CTR run folder or checkpoint (empty: pre-train)")
dbutils.widgets.text("k", "", "top-K per node (empty: config)")
dbutils.widgets.text("config", "../conf/graph.yaml", "YAML config (empty: none)")
dbutils.widgets.text("overrides", "", "dotted overrides (graph.<key>=value), space-separated")

# COMMAND ----------

from cvr_spark.config import load_config
from cvr_spark.graph.job import GraphJobConfig

files = [f for f in [dbutils.widgets.get("config").strip()] if f]
flags = {k: dbutils.widgets.get(k).strip() for k in ("data", "output", "ctr_checkpoint", "k")}
overrides = [f"graph.{k}={v}" for k, v in flags.items() if v] + dbutils.widgets.get("overrides").split()
cfg = load_config(files, overrides, schema=GraphJobConfig)

# COMMAND ----------

import json

from cvr_spark.graph.job import run_graph
from cvr_spark.spark import get_spark

result = run_graph(get_spark(cfg.spark), cfg.graph)
print(json.dumps(result, indent=2, default=str))
