"""Typed configuration: dataclasses, loaded from YAML, with dotted command-line overrides.

Every stage reads one :class:`Config`. Values come, in order of precedence, from the
dataclass defaults, then each YAML file given (``conf/*.yaml``), then ``key.sub=value``
overrides. Unknown keys are an error that names the key (OmegaConf structured configs).

Example::

    cfg = load_config(["conf/features.yaml"], ["features.min_count=5", "spark.master=local[2]"])
    cfg.features.min_count  # 5
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

REPO_ROOT = Path(__file__).resolve().parent.parent
# A source checkout reads the repository's conf/; an installed wheel carries it as cvr_spark/conf.
CONF_DIR = REPO_ROOT / "conf" if (REPO_ROOT / "conf").is_dir() else Path(__file__).resolve().parent / "conf"


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key and the source."""


@dataclass
class SparkConfig:
    """How to get a SparkSession when none is active (spark-submit and Databricks bring one)."""

    master: str = "local[*]"
    app_name: str = "cvr-spark"
    driver_memory: str = "4g"
    shuffle_partitions: int = 8
    # Delta jars: empty means "same version as the installed delta-spark package".
    delta_version: str = ""
    scala_suffix: str = "4.1_2.13"
    jars_cache: str = "~/.cache/cvr-spark/jars"
    ui: bool = False
    log_level: str = "WARN"
    # JVM options of the local driver (in local mode also the executor). Clusters: set the same
    # in spark.driver/executor.extraJavaOptions (README, databricks.yml).
    # * -XX:-DontCompileHugeMethods: HotSpot never JIT-compiles a method over 8000 bytecodes;
    #   Spark's whole-stage codegen makes such methods for wide projections (the raw Ali-CCP
    #   parse: 18 fields + the common-feature join), which then run in the bytecode
    #   interpreter: 2.5x slower parse measured.
    # * -XX:+UseParallelGC: the throughput collector for a batch job (G1's write barriers and
    #   concurrent threads compete with the two task threads of a 2-core machine).
    # * Tier4 thresholds 3x HotSpot's (5000 / 15000): C2 compiles only the hotter methods. A
    #   Spark job loads thousands of library and generated methods once; compiling them took
    #   53-58 s of compiler-thread time in the 84-88 s cold 5M-row feature job on 2 cores.
    # Together with fixed_heap: 12 % less time for the cold 5M-row feature job (README, JIT).
    jvm_options: str = ("-XX:-DontCompileHugeMethods -XX:+UseParallelGC "
                        "-XX:Tier4InvocationThreshold=15000 -XX:Tier4CompileThreshold=45000")
    # Start the local JVM with its whole heap (-Xms = driver_memory): the heap is not resized
    # while the first job fills it. The heap is committed at start but its pages are touched
    # only as it fills (resident memory grows as before); a driver_memory beyond the machine's
    # memory then fails at start instead of when the heap grows past it.
    fixed_heap: bool = True
    extra_conf: dict[str, str] = field(default_factory=dict)


from cvr_spark.data.features import FeaturesConfig  # noqa: E402  (stage configs live with their stage)
from cvr_spark.data.simulator import SimulateConfig  # noqa: E402


@dataclass
class Config:
    spark: SparkConfig = field(default_factory=SparkConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    simulate: SimulateConfig = field(default_factory=SimulateConfig)


def _resolve(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists() and not p.is_absolute() and (REPO_ROOT / p).exists():
        p = REPO_ROOT / p
    if not p.exists():
        raise ConfigError(f"config file not found: {path}")
    return p


def load_config(
    files: Sequence[str | Path] = (), overrides: Sequence[str] = (), schema: type = Config
) -> Any:
    """Build a typed config from defaults, YAML files and ``a.b=c`` overrides.

    Raises:
        ConfigError: a file is missing, a key is unknown or a value has the wrong type;
            the message names the key and where it came from.
    """
    merged = OmegaConf.structured(schema)
    for f in files:
        path = _resolve(f)
        try:
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        except OmegaConfBaseException as e:
            raise ConfigError(f"{path}: key '{e.full_key}': {_reason(e)}") from None
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override '{ov}' is not of the form key.sub=value")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([ov]))
        except OmegaConfBaseException as e:
            raise ConfigError(f"override '{ov}': key '{e.full_key}': {_reason(e)}") from None
    return OmegaConf.to_object(merged)


def _reason(e: OmegaConfBaseException) -> str:
    msg = str(e).splitlines()[0]
    return msg


def to_dict(cfg: Any) -> dict:
    """A plain, JSON-serialisable dict of a config dataclass (for manifests and logs)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
