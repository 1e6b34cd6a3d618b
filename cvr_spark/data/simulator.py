"""The causal simulator of DESIGN.md: Ali-CCP-shaped raw files with a known truth.

For every exposure the true click and conversion probabilities are known, and a potential
conversion is drawn for every exposure (clicked or not); the observed buy is
``click * potential_conversion``. Output under ``cfg.output``: the four raw Ali-CCP files
(``sample_skeleton_{train,test}.csv``, ``common_features_{train,test}.csv``) and a ``truth``
table (``sample_id, p_ctr, p_cvr, potential_conversion, split``).

The model of the world (every logit term is documented with its knob in
:class:`SimulateConfig`)::

    aff       = <user vector, item vector> / sqrt(latent_dim)
    s_buy     = conversion_affinity * aff + item quality - type shift + user buy effect
    s_click   = click_affinity * aff + item appeal + type shift + user click effect
                + scenario effect + selection_bias * s_buy
    p_ctr     = sigmoid(alpha_click + s_click);  p_cvr = sigmoid(alpha_buy + s_buy)

``alpha_click`` and ``alpha_buy`` are calibrated on the exposures so that the mean p_ctr is
``ctr_level`` and the click-weighted mean p_cvr (conversions per click) is ``cvr_level``.

Example::

    summary = simulate(spark, preset_config("small", output="/tmp/sim", rows=100_000))
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, Observation, SparkSession
from pyspark.sql import functions as F
from scipy.optimize import brentq

from cvr_spark.data import simulator_world as W

SPLITS = ("train", "test")
TRUTH_COLUMNS = ["sample_id", "p_ctr", "p_cvr", "potential_conversion", "split"]
_CALIBRATION_BIN = 0.05  # logit bin width of the calibration histogram


@dataclass
class SimulateConfig:
    """The causal simulator (see DESIGN.md): knobs for the data with a known truth.

    Fields left ``None`` take the value of ``preset`` (see :data:`PRESETS`).

    Attributes:
        output: folder of the four raw files (and of ``truth/`` unless ``truth_path`` is set).
        preset: ``default`` (Ali-CCP's shape: ~4% clicks, ~0.5% of clicks convert) or
            ``small`` (~10% clicks, ~10% of clicks convert, fewer users and items).
        rows: exposures in total, train and test together.
        users, items, clusters: population sizes; users and items share ``clusters`` latent
            clusters (items: cluster = item id mod clusters; users: hashed).
        ctr_level: target mean click probability over exposures.
        cvr_level: target conversion rate per click (click-weighted mean p_cvr).
        seed: every draw is a hash of the seed: same seed, same files.
        latent_dim: size of the user / item latent vectors.
        cluster_spread: in [0, 1); 0 = every member sits on its cluster centre.
        test_fraction: share of exposures written to the test files.
        conflict: in [0, 1); corr(item appeal, item quality) = -conflict: items that attract
            clicks tend to convert less.
        bait_fraction / daily_need_fraction: shares of click-bait items (click logit +type_shift,
            conversion logit -type_shift) and daily-need items (the opposite).
        type_shift: logit shift of bait / daily-need items.
        selection_bias: weight of the conversion score in the click logit; 0 = clicking does
            not select for converting beyond the shared user-item affinity; > 0 = clicked
            exposures convert more than unclicked ones (the selection bias of ESMM et al.).
        sparsity: probability that an optional single-valued field (121-129, 206, 207, 210,
            216, the cross fields) is missing from a line; 101, 205 and 301 are always present.
        user_skew / item_skew: power-law exponents of user activity and item popularity.
        targeting: share of exposures whose item comes from the user's own or neighbouring
            clusters (the rest: global popularity).
        click_affinity / conversion_affinity: weights of the user-item affinity in the logits.
        item_effect_sd / user_effect_sd: sd of the item appeal / quality and user effects.
        categories_per_cluster / brands_per_cluster: catalogue size per cluster.
        history_length: most entries per multi-valued history field (109_14, 110_14, 127_14, 150_14).
        cross_buckets: hash buckets per cross field (508, 509, 702, 853).
        calibration_rows: the intercepts are calibrated on the first min(rows, this) exposures.
        partitions: exposure partitions (0: one per million rows, at least 2).
        truth_path: where the truth table goes (empty: ``<output>/truth``).
        truth_format: ``delta`` or ``parquet``.
    """

    output: str = ""
    preset: str = "default"
    rows: Optional[int] = None
    users: Optional[int] = None
    items: Optional[int] = None
    clusters: Optional[int] = None
    ctr_level: Optional[float] = None
    cvr_level: Optional[float] = None
    seed: int = 7
    latent_dim: int = 8
    cluster_spread: float = 0.6
    test_fraction: float = 0.5
    conflict: float = 0.3
    bait_fraction: float = 0.05
    daily_need_fraction: float = 0.05
    type_shift: float = 1.5
    selection_bias: float = 0.5
    sparsity: float = 0.05
    user_skew: float = 0.6
    item_skew: float = 0.8
    targeting: float = 0.5
    click_affinity: float = 1.0
    conversion_affinity: float = 1.0
    item_effect_sd: float = 0.5
    user_effect_sd: float = 0.5
    categories_per_cluster: int = 8
    brands_per_cluster: int = 25
    history_length: int = 6
    cross_buckets: int = 100_000
    calibration_rows: int = 1_000_000
    partitions: int = 0
    truth_path: str = ""
    truth_format: str = "delta"

    def resolved(self) -> "SimulateConfig":
        """A copy with every ``None`` field taken from the preset, validated.

        Raises:
            ValueError: unknown preset or a knob out of range (the message names the key).
        """
        if self.preset not in PRESETS:
            raise ValueError(f"simulate.preset: unknown preset {self.preset!r}, expected one of {sorted(PRESETS)}")
        filled = {k: v for k, v in PRESETS[self.preset].items() if getattr(self, k) is None}
        cfg = dataclasses.replace(self, **filled)
        _validate(cfg)
        return cfg


PRESETS: dict[str, dict[str, Any]] = {
    "default": dict(rows=1_000_000, users=20_000, items=50_000, clusters=20, ctr_level=0.04, cvr_level=0.005),
    "small": dict(rows=200_000, users=3_000, items=6_000, clusters=10, ctr_level=0.10, cvr_level=0.10),
}


def _validate(cfg: SimulateConfig) -> None:
    checks = [
        ("rows", cfg.rows >= 1, "an integer >= 1"), ("users", cfg.users >= 1, "an integer >= 1"),
        ("clusters", cfg.clusters >= 3, "an integer >= 3"),
        ("items", cfg.items >= cfg.clusters, f"an integer >= clusters ({cfg.clusters})"),
        ("ctr_level", 0 < cfg.ctr_level < 1, "in (0, 1)"), ("cvr_level", 0 < cfg.cvr_level < 1, "in (0, 1)"),
        ("latent_dim", cfg.latent_dim >= 1, "an integer >= 1"),
        ("cluster_spread", 0 <= cfg.cluster_spread < 1, "in [0, 1)"),
        ("test_fraction", 0 <= cfg.test_fraction <= 1, "in [0, 1]"),
        ("conflict", 0 <= cfg.conflict < 1, "in [0, 1)"),
        ("bait_fraction", cfg.bait_fraction >= 0 and cfg.daily_need_fraction >= 0
         and cfg.bait_fraction + cfg.daily_need_fraction <= 1, "with daily_need_fraction: >= 0, sum <= 1"),
        ("sparsity", 0 <= cfg.sparsity < 1, "in [0, 1)"), ("targeting", 0 <= cfg.targeting <= 1, "in [0, 1]"),
        ("user_skew", cfg.user_skew >= 0, ">= 0"), ("item_skew", cfg.item_skew >= 0, ">= 0"),
        ("history_length", cfg.history_length >= 1, "an integer >= 1"),
        ("cross_buckets", cfg.cross_buckets >= 1, "an integer >= 1"),
        ("categories_per_cluster", cfg.categories_per_cluster >= 1, "an integer >= 1"),
        ("brands_per_cluster", cfg.brands_per_cluster >= 1, "an integer >= 1"),
        ("calibration_rows", cfg.calibration_rows >= 1, "an integer >= 1"),
        ("truth_format", cfg.truth_format in ("delta", "parquet"), "'delta' or 'parquet'"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise ValueError(f"simulate.{key} must be {expected}, got {getattr(cfg, key)!r}")


def preset_config(name: str, **overrides: Any) -> SimulateConfig:
    """A resolved :class:`SimulateConfig` of preset ``name`` with ``overrides`` applied.

    Raises:
        ValueError: unknown preset, unknown key in ``overrides`` or a knob out of range.
    """
    fields = {f.name for f in dataclasses.fields(SimulateConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"simulate: unknown key(s) {unknown}; known keys: {sorted(fields)}")
    return SimulateConfig(preset=name, **overrides).resolved()


@dataclass
class World:
    """Users and items (small frames, broadcast into the exposures) and the catalogue."""

    cfg: SimulateConfig
    catalogue: W.Catalogue
    users: DataFrame
    items: DataFrame

    @classmethod
    def build(cls, spark: SparkSession, cfg: SimulateConfig) -> "World":
        cat = W.catalogue(cfg)
        centres = W.cluster_centres(cfg.seed, cfg.clusters, cfg.latent_dim)  # [K, D]
        return cls(cfg, cat, W.build_users(spark, cfg, cat, centres), W.build_items(spark, cfg, cat, centres))

    def scored(self, spark: SparkSession, rows: int) -> DataFrame:
        """The first ``rows`` exposures with every latent column and the true logits (no intercepts)."""
        return W.with_scores(W.draw_exposures(spark, self.cfg, self.users, self.items, rows), self.cfg)


def calibrate(scored: DataFrame, ctr_level: float, cvr_level: float) -> tuple[float, float]:
    """Intercepts (alpha_click, alpha_buy) hitting the target rates on ``scored`` exposures.

    The logits are binned in Spark (a 2-D histogram of ``s_click`` x ``s_buy``); only the
    bins reach the driver, so the cost there is bounded by the number of bins, not of rows.
    """
    w = _CALIBRATION_BIN
    hist = scored.groupBy(F.round(F.col("s_click") / w).cast("long").alias("c"),
                          F.round(F.col("s_buy") / w).cast("long").alias("b")).count().collect()
    arr = np.array([(r["c"], r["b"], r["count"]) for r in hist], dtype=np.float64)  # [bins, 3]
    s_click, s_buy, n = arr[:, 0] * w, arr[:, 1] * w, arr[:, 2]

    def sig(x: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-x))

    alpha_c = brentq(lambda a: float((n * sig(a + s_click)).sum() / n.sum()) - ctr_level, -60, 60)
    clicks = n * sig(alpha_c + s_click)  # [bins]
    alpha_b = brentq(lambda a: float((clicks * sig(a + s_buy)).sum() / clicks.sum()) - cvr_level, -60, 60)
    return float(alpha_c), float(alpha_b)


def _calibrated(scored: DataFrame, cfg: SimulateConfig) -> tuple[DataFrame, dict[str, float]]:
    """Calibrate on the first ``calibration_rows`` of ``scored``; add truth, draws, ``sample_id``."""
    alpha_c, alpha_b = calibrate(scored.where(F.col("eid") < cfg.calibration_rows), cfg.ctr_level, cfg.cvr_level)
    frame = W.with_outcomes(scored, cfg, alpha_c, alpha_b).withColumn("sample_id", F.col("eid") + 1)
    return frame, {"alpha_click": alpha_c, "alpha_buy": alpha_b}


def simulate_frame(spark: SparkSession, cfg: SimulateConfig) -> tuple[DataFrame, dict[str, float]]:
    """All exposures of ``cfg`` with latent columns, truth and draws; writes nothing.

    Returns (frame, intercepts). Columns include ``sample_id``, ``split``, ``user_id``,
    ``item_id``, ``item_type`` (0 normal, 1 bait, 2 daily need), ``s_click``, ``s_buy``,
    ``p_ctr``, ``p_cvr``, ``click``, ``potential_conversion`` and ``buy``. Runs one Spark job
    (the calibration); the frame is recomputed by every action on it (persist it to reuse).
    """
    cfg = cfg.resolved()
    return _calibrated(World.build(spark, cfg).scored(spark, cfg.rows), cfg)


def simulate(spark: SparkSession, cfg: SimulateConfig) -> dict:
    """Write the four raw Ali-CCP files and the truth table; return a summary.

    The exposures are generated once and persisted (narrow: ids, logits, the skeleton's
    feature list), then read by the calibration, the raw writers and the truth writer.

    Raises:
        ValueError: ``cfg.output`` is empty or a knob is out of range.
    """
    from cvr_spark.tables import write_table

    cfg = cfg.resolved()
    if not cfg.output:
        raise ValueError("simulate.output: an output folder is required")
    if "://" not in cfg.output:
        os.makedirs(cfg.output, exist_ok=True)
    world = World.build(spark, cfg)
    base = W.with_skeleton_features(world.scored(spark, cfg.rows), cfg, world.catalogue,
                                    ["eid", "split", "user_id", "key", "s_click", "s_buy"])
    # Deserialized: PySpark's MEMORY_AND_DISK is the JVM's serialized level (5M rows: 41.4 /
    # 39.0 s with it, 35.4 / 34.0 s without, interleaved; see features._persist).
    base = base.persist(StorageLevel.MEMORY_AND_DISK_DESER)
    try:
        frame, alphas = _calibrated(base, cfg)
        stats, files = _write_raw(spark, world, frame.withColumn("line", F.expr(W.skeleton_line())), cfg.output)
        truth_path = cfg.truth_path or _join(cfg.output, "truth")
        version = write_table(frame.select(*TRUTH_COLUMNS), truth_path, cfg.truth_format)
    finally:
        base.unpersist()
    return {"rows": {s: stats[s]["rows"] for s in SPLITS}, "rates": stats, "intercepts": alphas,
            "files": files, "truth": {"path": truth_path, "format": cfg.truth_format, "version": version},
            "field_cardinality": world.catalogue.cardinality, "config": dataclasses.asdict(cfg)}


def _stats_exprs() -> list[Column]:
    exprs = []
    for s in SPLITS:
        on = F.col("split") == s
        exprs += [F.sum(F.when(on, c).otherwise(0)).alias(f"{s}_{name}") for c, name in (
            (F.lit(1), "rows"), (F.col("click"), "clicks"), (F.col("buy"), "conversions"),
            (F.col("potential_conversion"), "potential"), (F.col("p_ctr"), "sum_p_ctr"),
            (F.col("p_cvr"), "sum_p_cvr"))]
    return exprs


def _rates(metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Rows, click rate, conversions per click and per impression, true means, per split."""
    out = {}
    for s in SPLITS:
        n, clicks, buys = (int(metrics[f"{s}_{k}"] or 0) for k in ("rows", "clicks", "conversions"))
        out[s] = {"rows": n, "clicks": clicks, "conversions": buys,
                  "click_rate": clicks / n if n else math.nan,
                  "conversion_per_click": buys / clicks if clicks else math.nan,
                  "conversion_per_impression": buys / n if n else math.nan,
                  "potential_conversion_rate": int(metrics[f"{s}_potential"] or 0) / n if n else math.nan,
                  "mean_p_ctr": float(metrics[f"{s}_sum_p_ctr"] or 0) / n if n else math.nan,
                  "mean_p_cvr": float(metrics[f"{s}_sum_p_cvr"] or 0) / n if n else math.nan}
    return out


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def _write_raw(spark: SparkSession, world: World, frame: DataFrame, output: str) -> tuple[dict, dict[str, str]]:
    """Skeleton lines of both splits in one job (its metrics give the rates), then the common
    lines of the users seen in each split. Lines are sorted by sample_id / user id."""
    obs = Observation("simulate")
    skeleton = (frame.observe(obs, *_stats_exprs()).select("split", "sample_id", "line")
                .sortWithinPartitions("split", "sample_id").select("split", "line"))
    _write_split_texts(spark, skeleton, output, "sample_skeleton_{}.csv")
    stats = _rates(obs.get)
    seen = frame.select("split", "user_id").distinct()
    common = (W.common_lines(world.users, world.catalogue).join(F.broadcast(seen), "user_id").sortWithinPartitions("split", "user_id").select("split", "line"))
    _write_split_texts(spark, common, output, "common_features_{}.csv")
    files = {f"{kind}_{s}": _join(output, f"{kind}_{s}.csv") for s in SPLITS
             for kind in ("sample_skeleton", "common_features")}
    return stats, files


def _write_split_texts(spark: SparkSession, lines: DataFrame, output: str, pattern: str) -> None:
    """Write ``(split, line)`` rows as one text file per split, ``output/pattern.format(split)``."""
    tmp = _join(output, "_" + pattern.format("parts"))
    lines.write.mode("overwrite").partitionBy("split").option("compression", "none").text(tmp)
    for s in SPLITS:
        _merge_parts(spark, _join(tmp, f"split={s}"), _join(output, pattern.format(s)))
    _delete(spark, tmp)


def _merge_parts(spark: SparkSession, parts_dir: str, path: str) -> None:
    """Concatenate the ``part-*`` files of ``parts_dir`` (in name order) into the file ``path``;
    an absent folder (a split with no rows) gives an empty file.

    This is the price of one file per split: one sequential stream through the driver, about
    one read + one write of the file at disk speed (~1-2 min per 20 GB, i.e. per ~10^8 lines),
    after the parallel write. It goes through the Hadoop FileSystem API in the JVM (HDFS, S3,
    DBFS work; the bytes never pass through Python); without a JVM gateway (Spark Connect)
    the paths must be local (or FUSE-mounted).
    """
    jvm = getattr(spark, "_jvm", None)
    if jvm is None:
        _merge_local(parts_dir, path)
        return
    conf = spark._jsc.hadoopConfiguration()
    src = jvm.org.apache.hadoop.fs.Path(parts_dir)
    fs = src.getFileSystem(conf)
    fs.setWriteChecksum(False)  # no hidden .crc file beside the output on the local file system
    parts = [] if not fs.exists(src) else sorted(
        (st.getPath() for st in fs.listStatus(src) if st.getPath().getName().startswith("part-")),
        key=lambda p: p.getName())
    out = fs.create(jvm.org.apache.hadoop.fs.Path(path), True)
    try:
        for part in parts:
            stream = fs.open(part)
            try:
                jvm.org.apache.hadoop.io.IOUtils.copyBytes(stream, out, conf, False)
            finally:
                stream.close()
    finally:
        out.close()


def _delete(spark: SparkSession, path: str) -> None:
    jvm = getattr(spark, "_jvm", None)
    if jvm is None:
        shutil.rmtree(path, ignore_errors=True)
        return
    p = jvm.org.apache.hadoop.fs.Path(path)
    p.getFileSystem(spark._jsc.hadoopConfiguration()).delete(p, True)


def _merge_local(parts_dir: str, path: str) -> None:
    """:func:`_merge_parts` on the local file system, in Python."""
    parts = sorted(p for p in os.listdir(parts_dir) if p.startswith("part-")) if os.path.isdir(parts_dir) else []
    with open(path, "wb") as out:
        for p in parts:
            with open(os.path.join(parts_dir, p), "rb") as f:
                shutil.copyfileobj(f, out)
