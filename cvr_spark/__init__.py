"""cvr-spark: Spark data pipeline + PyTorch multi-task CTR/CVR training."""
__version__ = "0.1.0"
