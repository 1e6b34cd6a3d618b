# Databricks notebook source
# MAGIC %md
# MAGIC # Evaluate: a trained run's best weights on one split
# MAGIC
# MAGIC `cvr_spark.train.experiment.run_evaluate`: AUC per sample space (`ctr_auc`,
# MAGIC `cvr_auc_clicked`, `cvr_auc_all`, `ctcvr_auc`), logloss, PCOC and, on simulated data, the
# MAGIC ground-truth metrics; merged into `<run>/metrics.json`. Runs on the driver (pyarrow reader).

# COMMAND ----------

dbutils.widgets.text("run", "/Volumes/main/cvr/data/runs/esmm/seed1", "run folder or checkpoint")
dbutils.widgets.text("data", "/Volumes/main/cvr/data/features", "feature job output")
dbutils.widgets.dropdown("split", "test", ["train", "valid", "test"], "split")

# COMMAND ----------

import json

from cvr_spark.train.experiment import run_evaluate

result = run_evaluate(dbutils.widgets.get("run"), dbutils.widgets.get("data"), dbutils.widgets.get("split"))
print(json.dumps(result, indent=2, default=str))
