"""The simulated world behind :mod:`cvr_spark.data.simulator`: clusters, users, items, exposures.

Everything is a Spark SQL expression (no Python UDFs), built as SQL text and applied with
``selectExpr``: one call into the JVM per projection instead of one per operator, which keeps
the driver's planning time small next to the work. Every random draw is a hash of (seed, a
tag naming the draw, row ids) through ``xxhash64``, so a seed gives the same world and the
same exposures whatever the number of partitions or executors.

Latent structure: ``K`` cluster centres on a ring, ``c_k = (z_k + z_{k+1}) / sqrt(2)``, so
neighbouring clusters share half their centre (users of cluster k like items of clusters
k-1, k, k+1). A user or item vector is ``sqrt(1 - spread^2) c_cluster + spread * noise``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from cvr_spark.data.fields import FULL

_MASK53 = (1 << 53) - 1
_TWO53 = float(1 << 53)

ITEM_NORMAL, ITEM_BAIT, ITEM_DAILY_NEED = 0, 1, 2
SCENARIO_PROBS = (0.6, 0.3, 0.1)           # field 301: three scenarios, as in Ali-CCP
SCENARIO_CLICK_EFFECT = (0.0, -0.4, 0.4)   # click-logit shift per scenario
SEGMENTS_PER_CLUSTER = 4                   # field 121 (user segment) = cluster x 4 buckets
ITEMS_PER_SHOP = 8
PROFILE_RHO = 0.8                          # corr(profile field driver, latent driver)
# Single-valued user profile fields: (field, cardinality, driver); driver = latent dim index
# (mod latent_dim) or "buy" (the user's purchase propensity). Cardinalities follow Ali-CCP.
PROFILE_FIELDS = (("122", 13, 0), ("124", 2, 1), ("125", 7, 2), ("126", 3, "buy"),
                  ("127", 3, 3), ("128", 2, 4), ("129", 4, 5))
# Multi-valued user history field -> the item attribute it lists.
HISTORY_FIELDS = {"109_14": "cat", "110_14": "shop", "127_14": "brand", "150_14": "intent"}
# Item fields of the skeleton -> item attribute.
ITEM_ATTR_FIELDS = {"206": "cat", "207": "shop", "210": "intent", "216": "brand"}
# Cross fields: hash of (item attribute, whether the user's history lists it).
CROSS_FIELDS = {"508": ("109_14", "cat"), "509": ("110_14", "shop"),
                "702": ("127_14", "brand"), "853": ("150_14", "intent")}
SKELETON_FIELDS = ["205", *ITEM_ATTR_FIELDS, *CROSS_FIELDS, "301"]
PROFILE_COLUMNS = ["121", *(f for f, _, _ in PROFILE_FIELDS)]
COMMON_FIELDS = ["101", *PROFILE_COLUMNS, *HISTORY_FIELDS]
_ATTR_FIELD = {a: f for f, a in ITEM_ATTR_FIELDS.items()}


def _d(x: float) -> str:
    """A SQL double literal."""
    return f"({float(x)!r}D)"


def uniform(seed: int, tag: str, *cols: str) -> str:
    """SQL: U(0, 1) (open interval, 53 bits) from a hash of (seed, tag, cols)."""
    args = ", ".join([f"{int(seed)}L", f"'{tag}'", *cols])
    return f"((CAST(xxhash64({args}) & {_MASK53}L AS DOUBLE) + 0.5D) / {_TWO53!r}D)"


def normal(seed: int, tag: str, *cols: str) -> str:
    """SQL: N(0, 1) by Box-Muller from two hash uniforms."""
    u1, u2 = uniform(seed, tag + "/r", *cols), uniform(seed, tag + "/t", *cols)
    return f"(sqrt(-2.0D * ln({u1})) * cos({2 * math.pi!r}D * {u2}))"


def draw_int(seed: int, tag: str, n: int, *cols: str) -> str:
    """SQL: a uniform integer in [0, n)."""
    return f"CAST(floor({uniform(seed, tag, *cols)} * {int(n)}) AS BIGINT)"


def power_law_rank(u: str, n: int, skew: float) -> str:
    """SQL: rank in [0, n) with P(rank = k) ~ (k + 1)^-skew (inverse CDF of a continuous power law)."""
    if abs(skew - 1.0) < 1e-9:
        x = f"pow({_d(n + 1)}, {u})"
    else:
        e = 1.0 - skew
        x = f"pow(1.0D + {u} * {_d((n + 1) ** e - 1.0)}, {_d(1.0 / e)})"
    return f"least(greatest(CAST(floor({x}) AS BIGINT) - 1L, 0L), {int(n) - 1}L)"


def sigmoid(x: str) -> str:
    return f"(1.0D / (1.0D + exp(-({x}))))"


def _offset(u: str, offsets: tuple[int, ...]) -> str:
    """SQL: one of ``offsets``, each equally likely under the uniform ``u``."""
    arr = ", ".join(str(o) for o in offsets)
    return f"element_at(array({arr}), CAST(floor({u} * {len(offsets)}) AS INT) + 1)"


@dataclass(frozen=True)
class Catalogue:
    """Sizes of the simulated catalogue and the global feature-id offset of every field.

    A raw feature id is ``offset[field] + local id``: ids are unique across fields.
    """

    cardinality: dict[str, int]
    offset: dict[str, int]
    per_cluster: dict[str, int]  # cat / shop / brand values owned by each cluster

    def feature(self, field: str, local: str) -> str:
        """SQL: ``field\\x02feature_id\\x031.0`` (null when ``local`` is null, i.e. missing)."""
        return f"concat('{field}\\u0002', CAST(({local}) + {self.offset[field]}L AS STRING), '\\u00031.0')"


def catalogue(cfg: Any) -> Catalogue:
    """The catalogue of a resolved :class:`SimulateConfig`."""
    k = cfg.clusters
    per = {"cat": cfg.categories_per_cluster, "brand": cfg.brands_per_cluster,
           "shop": max(1, cfg.items // (k * ITEMS_PER_SHOP))}
    n_cat = k * per["cat"]
    attr = {"cat": n_cat, "shop": k * per["shop"], "brand": k * per["brand"],
            "intent": (n_cat + 1) // 2}
    card = {"101": cfg.users, "121": k * SEGMENTS_PER_CLUSTER, "205": cfg.items, "301": 3}
    card.update({f: c for f, c, _ in PROFILE_FIELDS})
    card.update({f: attr[a] for f, a in HISTORY_FIELDS.items()})
    card.update({f: attr[a] for f, a in ITEM_ATTR_FIELDS.items()})
    card.update({f: cfg.cross_buckets for f in CROSS_FIELDS})
    offset, nxt = {}, 1
    for f in FULL:
        offset[f], nxt = nxt, nxt + card[f]
    return Catalogue(card, offset, per)


def cluster_centres(seed: int, clusters: int, dim: int) -> np.ndarray:
    """[K, D] centres on a ring: neighbours share one of their two N(0, I) components."""
    z = np.random.default_rng([seed, 1]).standard_normal((clusters, dim))  # [K, D]
    return (z + np.roll(z, -1, axis=0)) / math.sqrt(2.0)  # [K, D]


def _latent(cfg: Any, centres: np.ndarray, cl: str, idc: str, tag: str) -> list[str]:
    """SQL ``<expr> AS <tag><k>`` for k < latent_dim: centre of the cluster plus noise."""
    a, out = math.sqrt(1.0 - cfg.cluster_spread ** 2), []
    for k in range(cfg.latent_dim):
        centre = f"element_at(array({', '.join(_d(x) for x in centres[:, k])}), CAST({cl} AS INT) + 1)"
        noise = normal(cfg.seed, f"{tag}{k}", idc)
        out.append(f"{centre} * {_d(a)} + {noise} * {_d(cfg.cluster_spread)} AS {tag}{k}")
    return out


def _bucket(z: str, card: int) -> str:
    """SQL: quantise a roughly N(0, 1) value into [0, card) (logistic approximation of Phi)."""
    return f"least(CAST(floor({sigmoid(f'1.7D * ({z})')} * {card}) AS BIGINT), {card - 1}L)"


def _missing(cfg: Any, field: str, value: str, *ids: str) -> str:
    """SQL: ``value``, or null with probability ``cfg.sparsity``."""
    return f"CASE WHEN {uniform(cfg.seed, f'miss{field}', *ids)} >= {_d(cfg.sparsity)} THEN {value} END"


def _history(cfg: Any, cat: Catalogue, field: str) -> str:
    """SQL: a user's distinct list of item attributes, from its own cluster (3/5) and the
    two neighbouring clusters (1/5 each)."""
    attr, seed = HISTORY_FIELDS[field], cfg.seed
    per = cat.per_cluster["cat" if attr == "intent" else attr]
    n = draw_int(seed, f"len{field}", cfg.history_length, "user_id")
    cl = f"pmod(u_cluster + {_offset(uniform(seed, f'off{field}', 'user_id', 'i'), (-1, 1, 0, 0, 0))}, {cfg.clusters})"
    value = f"{cl} * {per} + {draw_int(seed, f'h{field}', per, 'user_id', 'i')}"
    if attr == "intent":
        value = f"(({value}) DIV 2)"
    return f"array_distinct(transform(sequence(0, CAST({n} AS INT)), i -> CAST({value} AS BIGINT)))"


def build_users(spark: SparkSession, cfg: Any, cat: Catalogue, centres: np.ndarray) -> DataFrame:
    """One row per user: cluster, latent vector, effects, profile fields, history, common key."""
    seed, sd = cfg.seed, cfg.user_effect_sd
    users = spark.range(0, cfg.users, 1, max(1, cfg.users // 250_000 + 1)).selectExpr(
        "id AS user_id", f"{draw_int(seed, 'ucl', cfg.clusters, 'id')} AS u_cluster")
    users = users.selectExpr(
        "user_id", "u_cluster", *_latent(cfg, centres, "u_cluster", "user_id", "u"),
        f"{normal(seed, 'uclick', 'user_id')} * {_d(sd)} AS click_u",
        f"{normal(seed, 'ubuy', 'user_id')} * {_d(sd)} AS buy_u",
        f"substring(md5(concat_ws(':', '{seed}', 'user', CAST(user_id AS STRING))), 1, 16) AS key",
        *[f"{_history(cfg, cat, f)} AS h{f}" for f in HISTORY_FIELDS])
    seg = _bucket(f"u{6 % cfg.latent_dim}", SEGMENTS_PER_CLUSTER)
    prof = [f"{_missing(cfg, '121', f'u_cluster * {SEGMENTS_PER_CLUSTER} + {seg}', 'user_id')} AS p121"]
    for f, card, driver in PROFILE_FIELDS:
        if driver == "buy":
            d = f"buy_u / {_d(sd)}" if sd > 0 else "0.0D"
        else:
            d = f"u{int(driver) % cfg.latent_dim}"
        z = f"({d}) * {_d(PROFILE_RHO)} + {normal(seed, f'p{f}', 'user_id')} * {_d(math.sqrt(1 - PROFILE_RHO ** 2))}"
        prof.append(f"{_missing(cfg, f, _bucket(z, card), 'user_id')} AS p{f}")
    return users.selectExpr("*", *prof)


def build_items(spark: SparkSession, cfg: Any, cat: Catalogue, centres: np.ndarray) -> DataFrame:
    """One row per item: cluster (= id mod K), latent vector, type, click/buy effects, attributes."""
    seed, rho, sd = cfg.seed, cfg.conflict, cfg.item_effect_sd
    items = spark.range(0, cfg.items, 1, max(1, cfg.items // 250_000 + 1)).selectExpr(
        "id AS item_id", f"pmod(id, {cfg.clusters}) AS i_cluster",
        f"{uniform(seed, 'itype', 'id')} AS t", f"{normal(seed, 'appeal', 'id')} AS z1",
        f"{normal(seed, 'quality', 'id')} AS z2")
    per = cat.per_cluster
    attrs = [f"i_cluster * {per[a]} + {draw_int(seed, f'i{a}', per[a], 'item_id')} AS {a}"
             for a in ("cat", "shop", "brand")]
    items = items.selectExpr(
        "item_id", "i_cluster", *_latent(cfg, centres, "i_cluster", "item_id", "i"),
        f"CASE WHEN t < {_d(cfg.bait_fraction)} THEN {ITEM_BAIT} WHEN t < "
        f"{_d(cfg.bait_fraction + cfg.daily_need_fraction)} THEN {ITEM_DAILY_NEED} ELSE {ITEM_NORMAL} END AS item_type",
        f"z1 * {_d(sd)} AS appeal", f"(z1 * {_d(-rho)} + z2 * {_d(math.sqrt(1 - rho ** 2))}) * {_d(sd)} AS quality",
        *attrs)
    shift = (f"CASE item_type WHEN {ITEM_BAIT} THEN {_d(cfg.type_shift)} "
             f"WHEN {ITEM_DAILY_NEED} THEN {_d(-cfg.type_shift)} ELSE 0.0D END")
    obs = [f"{_missing(cfg, f, a, 'item_id')} AS o{f}" for f, a in ITEM_ATTR_FIELDS.items()]
    return items.selectExpr("*", "cat DIV 2 AS intent").selectExpr(
        "*", f"appeal + {shift} AS click_i", f"quality - {shift} AS buy_i", *obs)


def draw_exposures(spark: SparkSession, cfg: Any, users: DataFrame, items: DataFrame, rows: int) -> DataFrame:
    """``rows`` exposures: skewed user activity, item popularity, part targeted at the user's clusters."""
    seed, k = cfg.seed, cfg.clusters
    parts = cfg.partitions or max(2, -(-rows // 1_000_000))
    scen_u, cum = uniform(seed, "scen", "id"), np.cumsum(SCENARIO_PROBS)
    e = spark.range(0, rows, 1, parts).selectExpr(
        "id AS eid", f"{power_law_rank(uniform(seed, 'user', 'id'), cfg.users, cfg.user_skew)} AS user_id",
        f"CASE WHEN {scen_u} < {_d(cum[0])} THEN 0 WHEN {scen_u} < {_d(cum[1])} THEN 1 ELSE 2 END AS scenario",
        f"CASE WHEN {uniform(seed, 'split', 'id')} < {_d(cfg.test_fraction)} THEN 'test' ELSE 'train' END AS split")
    e = e.join(F.broadcast(users), "user_id")
    near = f"pmod(u_cluster + {_offset(uniform(seed, 'toff', 'eid'), (-1, 1, 0, 0))}, {k})"
    targeted = f"{near} + {power_law_rank(uniform(seed, 'titem', 'eid'), cfg.items // k, cfg.item_skew)} * {k}"
    popular = power_law_rank(uniform(seed, "item", "eid"), cfg.items, cfg.item_skew)
    e = e.selectExpr("*", f"CASE WHEN {uniform(seed, 'tgt', 'eid')} < {_d(cfg.targeting)} "
                          f"THEN {targeted} ELSE {popular} END AS item_id")
    return e.join(F.broadcast(items), "item_id")


def with_scores(e: DataFrame, cfg: Any) -> DataFrame:
    """Add ``s_click`` and ``s_buy``: the true click / conversion logits without intercepts."""
    aff = f"(({' + '.join(f'u{k} * i{k}' for k in range(cfg.latent_dim))}) / {_d(math.sqrt(cfg.latent_dim))})"
    scen = f"element_at(array({', '.join(_d(x) for x in SCENARIO_CLICK_EFFECT)}), scenario + 1)"
    e = e.selectExpr("*", f"{aff} * {_d(cfg.conversion_affinity)} + buy_i + buy_u AS s_buy")
    return e.selectExpr("*", f"{aff} * {_d(cfg.click_affinity)} + click_i + click_u + {scen} "
                             f"+ s_buy * {_d(cfg.selection_bias)} AS s_click")


def with_outcomes(e: DataFrame, cfg: Any, alpha_click: float, alpha_buy: float) -> DataFrame:
    """Add true probabilities and the draws: click, potential conversion, observed buy."""
    seed = cfg.seed
    e = e.selectExpr("*", f"{sigmoid(f's_click + {_d(alpha_click)}')} AS p_ctr",
                     f"{sigmoid(f's_buy + {_d(alpha_buy)}')} AS p_cvr")
    e = e.selectExpr("*", f"CAST({uniform(seed, 'click', 'eid')} < p_ctr AS INT) AS click",
                     f"CAST({uniform(seed, 'convert', 'eid')} < p_cvr AS INT) AS potential_conversion")
    return e.selectExpr("*", "click * potential_conversion AS buy")


def _cross(cfg: Any, field: str) -> str:
    """SQL: hash of (item attribute, whether the user's history lists it); missing with the
    item attribute or with probability ``sparsity``."""
    hist, attr = CROSS_FIELDS[field]
    value = f"pmod(xxhash64({cfg.seed}L, '{field}', {attr}, array_contains(h{hist}, {attr})), {cfg.cross_buckets}L)"
    return f"CASE WHEN o{_ATTR_FIELD[attr]} IS NOT NULL THEN {_missing(cfg, field, value, 'eid')} END"


def _with_feature_list(df: DataFrame, cat: Catalogue, keep: list[str], singles: dict[str, str],
                       multis: dict[str, str]) -> DataFrame:
    """``keep`` + ``feature_count`` + ``feature_list`` from nullable single-valued local ids
    (SQL per field) and array-valued ones (array column per field)."""
    df = df.selectExpr(*keep, *[f"{e} AS f{f}" for f, e in singles.items()], *multis.values())
    feats = [cat.feature(f, f"f{f}") for f in singles]
    feats += [f"transform({c}, x -> {cat.feature(f, 'x')})" for f, c in multis.items()]
    count = [f"CASE WHEN f{f} IS NULL THEN 0 ELSE 1 END" for f in singles] + [f"size({c})" for c in multis.values()]
    return df.selectExpr(*keep, f"{' + '.join(count)} AS feature_count",
                         f"concat_ws('\\u0001', {', '.join(feats)}) AS feature_list")


def with_skeleton_features(e: DataFrame, cfg: Any, cat: Catalogue, keep: list[str]) -> DataFrame:
    """``keep`` + ``feature_count`` + ``feature_list`` of an exposure's own fields (item, cross, context)."""
    singles = {"205": "item_id", **{f: f"o{f}" for f in ITEM_ATTR_FIELDS}}
    singles.update({f: _cross(cfg, f) for f in CROSS_FIELDS})
    singles["301"] = "CAST(scenario AS BIGINT)"
    return _with_feature_list(e, cat, keep, singles, {})


def skeleton_line() -> str:
    """SQL: ``sample_id,click,buy,common_feature_key,feature_count,feature_list`` of an exposure."""
    cols = ("sample_id", "click", "buy", "key", "feature_count", "feature_list")
    return f"concat_ws(',', {', '.join(f'CAST({c} AS STRING)' for c in cols)})"


def common_lines(users: DataFrame, cat: Catalogue) -> DataFrame:
    """``user_id`` + ``line`` (``common_feature_key,feature_count,feature_list``) per user."""
    singles = {"101": "user_id", **{f: f"p{f}" for f in PROFILE_COLUMNS}}
    df = _with_feature_list(users, cat, ["user_id", "key"], singles, {f: f"h{f}" for f in HISTORY_FIELDS})
    return df.selectExpr("user_id", "concat_ws(',', key, CAST(feature_count AS STRING), feature_list) AS line")
