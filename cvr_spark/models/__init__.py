"""Model zoo: every model of MODELS.md behind one interface (see ``base``)."""
from cvr_spark.models.base import CVRModel, FeatureSpec, ModelConfig  # noqa: F401
from cvr_spark.models.registry import build, describe, get, names, register  # noqa: F401
