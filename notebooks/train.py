# Databricks notebook source
# MAGIC %md
# MAGIC # Train: models x seeds -> checkpoints, test metrics, report
# MAGIC
# MAGIC `cvr_spark.train.experiment.run_train`. `processes` > 1 runs every run on that many ranks
# MAGIC with Spark's `TorchDistributor` (NCCL on GPUs, gloo on CPU): on a GPU cluster set
# MAGIC `use_gpu=true`, `processes` = GPUs to use and `local_mode=false` to place one rank per
# MAGIC executor GPU (the run folder `out` must then be shared storage, e.g. a `/Volumes/...` path).
# MAGIC `train_config` holds the `train` / `model` option sections (see `conf/train.yaml`);
# MAGIC `overrides` (e.g. `train.patience=2 model.lr=0.002`) win over it.

# COMMAND ----------

dbutils.widgets.text("data", "/Volumes/main/cvr/data/features", "feature job output")
dbutils.widgets.text("models", "esmm,aitm,cstwa", "models (comma-separated)")
dbutils.widgets.text("seeds", "1", "seeds (comma-separated)")
dbutils.widgets.text("preset", "paper", "preset (conf/models/<model>.yaml block)")
dbutils.widgets.text("epochs", "", "epochs (empty: train.epochs)")
dbutils.widgets.text("processes", "1", "ranks per run")
dbutils.widgets.dropdown("use_gpu", "auto", ["auto", "true", "false"], "use GPUs")
dbutils.widgets.dropdown("local_mode", "true", ["true", "false"], "TorchDistributor local_mode")
dbutils.widgets.text("out", "/Volumes/main/cvr/data/runs", "run folder root")
dbutils.widgets.text("graphs", "", "graph folder for CSTWA (empty: <data>/graphs)")
dbutils.widgets.text("train_config", "../conf/train.yaml", "train/model options YAML (empty: none)")
dbutils.widgets.text("overrides", "", "dotted overrides, space-separated")

# COMMAND ----------

from omegaconf import OmegaConf

path = dbutils.widgets.get("train_config").strip()
options = OmegaConf.merge(OmegaConf.load(path) if path else {},
                          OmegaConf.from_dotlist(dbutils.widgets.get("overrides").split()))
models = [m.strip() for m in dbutils.widgets.get("models").split(",") if m.strip()]
seeds = [int(s) for s in dbutils.widgets.get("seeds").split(",") if s.strip()]
epochs = int(dbutils.widgets.get("epochs")) if dbutils.widgets.get("epochs").strip() else None
use_gpu = {"auto": None, "true": True, "false": False}[dbutils.widgets.get("use_gpu")]

# COMMAND ----------

import json

from cvr_spark.train.experiment import run_train

result = run_train(dbutils.widgets.get("data"), models, seeds, dbutils.widgets.get("preset"), epochs,
                   int(dbutils.widgets.get("processes")), dbutils.widgets.get("out"),
                   OmegaConf.to_container(options), use_gpu=use_gpu,
                   local_mode=dbutils.widgets.get("local_mode") == "true",
                   graph_dir=dbutils.widgets.get("graphs").strip() or None)
print(json.dumps([{k: r[k] for k in ("model", "seed", "run_dir", "metrics")} for r in result["runs"]],
                 indent=2, default=str))
