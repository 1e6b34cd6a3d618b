"""Batch scoring: a trained run's best weights applied to a table in Spark, written as ``predictions``.

:func:`score_table` reads the features table named by the feature job's manifest (or any
table with the same fields, already encoded with the stored vocabulary; :func:`encode_raw`
encodes a raw canonical frame with it), scores it with ``mapInPandas`` and writes
``predictions`` (``sample_id``, ``p_ctr``, ``p_cvr``, ``p_ctcvr``) as a new table version.

How the model reaches the executors (the pyspark.ml pattern): the driver serialises the best
``state_dict`` once (``torch.save`` bytes) and broadcasts it with the model name, its options
and the feature spec as plain values. Each Python worker rebuilds the model once per broadcast
(cached across the partitions it runs), loads the weights and predicts whole Arrow batches
under ``torch.inference_mode()``; rows become tensors through the trainer's own conversion
(:meth:`cvr_spark.train.loader.Columns.from_arrow`), so scoring sees exactly what training saw.

Decisions where the spec is silent:

* ``p_cvr`` / ``p_ctcvr`` are the model's outputs of those names (as ``predict`` returns them);
  a model whose CVR or CTCVR score is another output (CTnoCVR's ``p_score``) gets that output
  as an extra column of the same name. Probabilities are written as double.
* The input defaults to the features table version the manifest names (the one its vocabulary
  sizes describe); ``version`` pins another one (or a version of ``input_table``).
* ``output`` defaults to ``<run_dir>/predictions``.
* Delta writes record the run, model and input in the commit's ``userMetadata``.
* A raw input lacking a field column is an error naming it; unseen or rare ids map to 0.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

from cvr_spark.config import SparkConfig, load_config
from cvr_spark.tables import FORMATS, is_delta, read_table, write_table

log = logging.getLogger(__name__)

OUTPUT_COLUMNS = ("p_ctr", "p_cvr", "p_ctcvr")
_ROW = "_row"
_USER_METADATA = "spark.databricks.delta.commitInfo.userMetadata"
_MODEL_CACHE: dict[str, Any] = {}  # per Python worker: the model of the last broadcast seen


@dataclass
class ScoreConfig:
    """The scoring job (``conf/score.yaml``; ``score.<key>=value`` overrides)."""

    run: str = ""  # run folder (<out>/<model>/seed<k>) or checkpoint file
    data: str = ""  # feature job output folder (manifest.json, features/, vocab/)
    split: Optional[str] = None  # score one split of the input (None: every row)
    output: str = ""  # predictions table path (empty: <run>/predictions)
    format: str = "delta"
    version: Optional[int] = None  # input table version (None: the manifest's)
    input_table: Optional[str] = None  # path or catalog name of another table to score
    raw: bool = False  # the input holds raw (string) ids: encode with the stored vocab first
    batch_size: int = 8192  # rows per forward pass inside an Arrow batch
    device: str = "cpu"  # executors' torch device: cpu, cuda, auto
    threads: int = 1  # torch threads per Python worker (0: torch's default)

    def check(self) -> None:
        """Raises: ValueError naming the first option out of range."""
        if not self.run or not self.data:
            raise ValueError("score.run and score.data are required (run folder, feature job output)")
        if self.format not in FORMATS:
            raise ValueError(f"score.format must be one of {FORMATS}, got {self.format!r}")
        if self.batch_size < 1 or self.threads < 0:
            raise ValueError(f"score.batch_size must be >= 1 and score.threads >= 0, "
                             f"got {self.batch_size}, {self.threads}")
        if self.device not in ("cpu", "cuda", "auto") and not self.device.startswith("cuda:"):
            raise ValueError(f"score.device must be cpu, cuda[:i] or auto, got {self.device!r}")


@dataclass
class ScoreJobConfig:
    """What ``jobs/score.py`` reads: the Spark session and the scoring job."""

    spark: SparkConfig = field(default_factory=SparkConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)


def load_score_config(files: Sequence[str] = (), overrides: Sequence[str] = ()) -> ScoreJobConfig:
    """Defaults, then YAML ``files``, then ``score.key=value`` overrides (unknown keys: ConfigError)."""
    return load_config(files, overrides, schema=ScoreJobConfig)


# ---------------------------------------------------------------- inputs

def _resolve(data_dir: str | Path, info: Mapping[str, Any], default: str) -> str:
    path = str(info.get("path") or default)
    if Path(path).is_absolute() or "://" in path or path.startswith("dbfs:"):
        return path
    return str(Path(data_dir) / path)


def read_manifest_table(spark: Any, data_dir: str | Path, manifest: Mapping[str, Any], name: str,
                        version: Optional[int] = None):
    """Table ``name`` (``features``, ``vocab``...) of a feature job output, at the manifest's
    version unless ``version`` is given.

    Raises:
        FileNotFoundError: no such table where the manifest says.
    """
    info = (manifest.get("tables") or {}).get(name) or {}
    path = _resolve(data_dir, info, name)
    fmt = info.get("format") or ("delta" if is_delta(path, spark) else "parquet")
    return read_table(spark, path, fmt, info.get("version") if version is None else version)


def _fields(manifest: Mapping[str, Any]) -> list:
    from cvr_spark.data.fields import FieldInfo

    return [FieldInfo(f["name"], f.get("group", "context"), bool(f.get("multi"))) for f in manifest["fields"]]


def encode_raw(spark: Any, df: Any, data_dir: str | Path) -> Any:
    """Encode a raw canonical frame (string ids; arrays for multi-valued fields) with the
    vocabulary stored by the feature job in ``data_dir``: kept ids -> their index, unseen,
    rare and missing ids -> 0. Other columns pass through.

    Raises:
        KeyError / TypeError: a field column is missing or has the wrong type (names it).
    """
    from pyspark.sql import functions as F

    from cvr_spark.data.features import encode
    from cvr_spark.train.loader import load_manifest

    manifest = load_manifest(data_dir)
    fields = _fields(manifest)
    vocab = read_manifest_table(spark, data_dir, manifest, "vocab")
    sizes = {f["name"]: int(f["vocab_size"]) for f in manifest["fields"]}
    added = any(f.multi for f in fields) and _ROW not in df.columns
    if added:
        df = df.withColumn(_ROW, F.monotonically_increasing_id())
    out = encode(df, vocab, fields, sizes)
    return out.drop(_ROW) if added else out


def read_input(spark: Any, data_dir: str | Path, manifest: Mapping[str, Any], *, split: Optional[str] = None,
               version: Optional[int] = None, input_table: Any = None) -> tuple[Any, dict]:
    """The frame to score and a description of where it came from.

    ``input_table``: None (the manifest's features table), a DataFrame, a path (Delta, the
    versioned Parquet layout, or plain Parquet) or a catalog table name.

    Raises:
        ValueError: ``split`` is given but the input has no ``split`` column.
    """
    if input_table is None:
        df = read_manifest_table(spark, data_dir, manifest, "features", version)
        info = (manifest.get("tables") or {}).get("features") or {}
        source = {"table": _resolve(data_dir, info, "features"),
                  "version": info.get("version") if version is None else version}
    elif not isinstance(input_table, str):
        df, source = input_table, {"table": "<DataFrame>", "version": None}
    elif "/" in input_table or ":" in input_table:
        if is_delta(input_table, spark):
            df = read_table(spark, input_table, "delta", version)
        elif (Path(input_table) / "_latest").exists():
            df = read_table(spark, input_table, "parquet", version)
        else:
            df = spark.read.parquet(input_table)
        source = {"table": input_table, "version": version}
    else:
        reader = spark.read if version is None else spark.read.option("versionAsOf", int(version))
        df, source = reader.table(input_table), {"table": input_table, "version": version}
    if split is not None:
        if "split" not in df.columns:
            raise ValueError(f"split='{split}' given but input {source['table']} has no 'split' column "
                             f"(columns: {df.columns})")
        df = df.where(df["split"] == split)
    return df, {**source, "split": split}


# ---------------------------------------------------------------- the model

def check_spec(saved: Any, current: Any, data_dir: str | Path) -> None:
    """Raises: ValueError when the run was trained on other fields or vocabularies than ``data_dir``'s."""
    for attr in ("sparse_fields", "sparse_vocab", "multi_fields", "multi_vocab", "dense_fields"):
        if tuple(getattr(saved, attr)) != tuple(getattr(current, attr)):
            raise ValueError(f"{Path(data_dir) / 'manifest.json'}: '{attr}' is {tuple(getattr(current, attr))} "
                             f"but the run was trained with {tuple(getattr(saved, attr))}; score with the "
                             "feature job output the run was trained on")


def scoring_payload(run_dir: str | Path) -> dict:
    """What the executors need, as plain values: model name, options, spec, output names and the
    best weights as ``torch.save`` bytes, and ``key``, their digest (the workers' model cache key).

    Raises:
        FileNotFoundError: no checkpoint. KeyError: the checkpoint lacks the run's metadata.
    """
    import torch

    from cvr_spark.models import registry
    from cvr_spark.train.checkpoint import load_checkpoint

    state = load_checkpoint(run_dir)
    meta = state.get("meta") or {}
    missing = [k for k in ("model_name", "model_options", "spec") if k not in meta]
    if missing:
        raise KeyError(f"{run_dir}: checkpoint metadata lacks {missing} (not written by cvr_spark.train)")
    weights = state["best_model"] if state.get("best_model") is not None else state["model"]
    buf = io.BytesIO()
    torch.save(dict(weights), buf)
    digest = hashlib.sha256(buf.getvalue())
    job = meta.get("job") or {}
    digest.update(json.dumps([meta["model_name"], meta["model_options"], meta["spec"],
                              job.get("graph_dir"), job.get("graph_version")], default=str).encode())
    cls = registry.get(meta["model_name"])
    outputs = list(dict.fromkeys([*OUTPUT_COLUMNS, cls.cvr_output, cls.ctcvr_output]))
    return {"model_name": meta["model_name"], "model_options": dict(meta["model_options"]),
            "spec": dict(meta["spec"]), "outputs": outputs, "weights": buf.getvalue(),
            "seed": job.get("seed"), "key": digest.hexdigest(),
            # Graph models (CSTWA's Structure Migrator) read the run's pinned graph version on the
            # executors (graphs are not in checkpoints): the folder must be shared storage there.
            "graph_dir": job.get("graph_dir"), "graph_version": job.get("graph_version")}


def build_model(payload: Mapping[str, Any], device: str = "cpu") -> Any:
    """The model of :func:`scoring_payload`, weights loaded, in eval mode on ``device``."""
    import torch

    from cvr_spark.models import registry
    from cvr_spark.train.distributed import spec_from_dict
    from cvr_spark.train.loop import resolve_device

    model = registry.build(payload["model_name"], spec_from_dict(payload["spec"]), payload["model_options"])
    weights = torch.load(io.BytesIO(payload["weights"]), map_location="cpu", weights_only=True)
    model.load_state_dict(weights)
    model = model.to(resolve_device(device))
    if payload.get("graph_dir"):
        from cvr_spark.train.distributed import attach_graphs

        attach_graphs(model, payload["graph_dir"], payload["graph_dir"], payload.get("graph_version"))
    return model.eval()


def _cached_model(bc: Any, device: str) -> Any:
    key = f"{bc.value['key']}:{device}"  # worker-side broadcasts carry no id; the payload a digest
    if _MODEL_CACHE.get("key") != key:
        _MODEL_CACHE.clear()
        _MODEL_CACHE.update(key=key, model=build_model(bc.value, device))
    return _MODEL_CACHE["model"]


def score_batches(batches: Iterator[Any], bc: Any, batch_size: int, device: str,
                  threads: int) -> Iterator[Any]:
    """``mapInPandas`` function: pandas batches of the input -> pandas batches of predictions.

    The model comes from the broadcast ``bc`` (built once per worker and broadcast); rows are
    converted like the trainer's (indices checked against the vocabulary sizes).
    """
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import torch

    from cvr_spark.train.loader import LABELS, Columns
    from cvr_spark.train.loop import to_device

    if threads:
        torch.set_num_threads(threads)
    model = _cached_model(bc, device)
    spec, outputs = model.spec, bc.value["outputs"]
    dev = next(model.parameters()).device
    with torch.inference_mode():
        for pdf in batches:
            table = pa.Table.from_pandas(pdf, preserve_index=False)
            for label in LABELS:  # the converter wants labels; scoring inputs may have none
                if label not in table.column_names:
                    table = table.append_column(label, pa.array(np.zeros(table.num_rows, np.float32)))
            cols = Columns.from_arrow(table, spec, "scoring input batch")
            for start in range(0, len(cols), batch_size):
                idx = torch.arange(start, min(start + batch_size, len(cols)))  # [B]
                out = model(to_device(cols.take(idx), dev))
                frame = {"sample_id": cols.sample_id[idx].numpy()}
                frame.update({k: out[k].float().cpu().numpy().astype(np.float64) for k in outputs})
                yield pd.DataFrame(frame)


def prediction_frame(df: Any, payload: Mapping[str, Any], *, batch_size: int = 8192,
                     device: str = "cpu", threads: int = 1) -> Any:
    """``df`` (encoded fields) -> predictions frame (sample_id, p_ctr, p_cvr, p_ctcvr[, extra]).

    Raises:
        KeyError: a column the model reads is missing from ``df`` (names them).
    """
    from cvr_spark.train.distributed import spec_from_dict

    spec = spec_from_dict(payload["spec"])
    needed = ["sample_id", *spec.sparse_fields, *spec.multi_fields, *spec.dense_fields]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise KeyError(f"scoring input lacks column(s) {missing} (columns: {df.columns})")
    schema = "sample_id long, " + ", ".join(f"`{c}` double" for c in payload["outputs"])
    bc = df.sparkSession.sparkContext.broadcast(dict(payload))
    fn = partial(score_batches, bc=bc, batch_size=int(batch_size), device=device, threads=int(threads))
    return df.select(*needed).mapInPandas(fn, schema)


# ---------------------------------------------------------------- the job

def _write(spark: Any, frame: Any, output: str, fmt: str, lineage: Mapping[str, Any]) -> int:
    if fmt != "delta":
        return write_table(frame, output, fmt)
    before = spark.conf.get(_USER_METADATA, None)
    spark.conf.set(_USER_METADATA, json.dumps(lineage, default=str))
    try:
        return write_table(frame, output, fmt)
    finally:
        if before is None:
            spark.conf.unset(_USER_METADATA)
        else:
            spark.conf.set(_USER_METADATA, before)


def score_table(spark: Any, run_dir: str | Path, data_dir: str | Path, *, split: Optional[str] = None,
                output: Optional[str | Path] = None, fmt: str = "delta", version: Optional[int] = None,
                input_table: Any = None, raw: bool = False, batch_size: int = 8192, device: str = "cpu",
                threads: int = 1) -> dict:
    """Score a table with a trained run's best weights; write ``predictions`` as a new version.

    Args:
        run_dir: run folder (``<out>/<model>/seed<k>``) or its ``checkpoint.pt``.
        data_dir: the feature job output the run was trained on (manifest, features, vocab).
        split: keep only rows of this ``split``. output: predictions table path
            (default ``<run_dir>/predictions``). fmt: ``delta`` or ``parquet``.
        version: input table version (default: the one the manifest names).
        input_table: score this instead of the features table (see :func:`read_input`).
        raw: the input holds raw ids; encode it with the stored vocabulary first.
        batch_size / device / threads: executor-side forward passes.

    Returns:
        ``output``, ``format``, ``version`` (of predictions), ``rows``, ``columns``, ``model``,
        ``seed``, ``run``, ``input`` (table, version, split).

    Raises:
        FileNotFoundError: no checkpoint / manifest / table. ValueError: the run's features differ
            from ``data_dir``'s, or a bad option. KeyError: the input lacks a column.
    """
    from cvr_spark.models.base import FeatureSpec
    from cvr_spark.train.distributed import spec_from_dict
    from cvr_spark.train.loader import load_manifest

    if fmt not in FORMATS:
        raise ValueError(f"predictions format must be one of {FORMATS}, got {fmt!r}")
    run_path = Path(run_dir)
    run_folder = run_path if run_path.is_dir() else run_path.parent
    manifest = load_manifest(data_dir)
    payload = scoring_payload(run_path)
    check_spec(spec_from_dict(payload["spec"]), FeatureSpec.from_manifest(manifest), data_dir)
    df, source = read_input(spark, data_dir, manifest, split=split, version=version, input_table=input_table)
    if raw:
        df = encode_raw(spark, df, data_dir)
    frame = prediction_frame(df, payload, batch_size=batch_size, device=device, threads=threads)
    output = str(output or run_folder / "predictions")
    lineage = {"run": str(run_folder), "model": payload["model_name"], "seed": payload["seed"], "input": source}
    written = _write(spark, frame, output, fmt, lineage)
    rows = read_table(spark, output, fmt, written).count()
    log.info("scored %d rows of %s with %s -> %s v%d", rows, source["table"], payload["model_name"], output, written)
    return {"output": output, "format": fmt, "version": written, "rows": int(rows),
            "columns": ["sample_id", *payload["outputs"]], "model": payload["model_name"],
            "seed": payload["seed"], "run": str(run_folder), "input": source}


def run_score(spark: Any, cfg: ScoreConfig) -> dict:
    """:func:`score_table` with a :class:`ScoreConfig` (``cfg.check()`` first)."""
    cfg.check()
    return score_table(spark, cfg.run, cfg.data, split=cfg.split, output=cfg.output or None, fmt=cfg.format,
                       version=cfg.version, input_table=cfg.input_table, raw=cfg.raw,
                       batch_size=cfg.batch_size, device=cfg.device, threads=cfg.threads)


# ---------------------------------------------------------------- command line

SCORE_FLAGS = ("run", "data", "split", "output", "format", "version", "input_table", "device")


def add_score_arguments(p: Any) -> None:
    """The flags of ``jobs/score.py`` / ``cvr-spark score`` on an argparse parser."""
    p.add_argument("--run", help="run folder (<out>/<model>/seed<k>) or checkpoint file")
    p.add_argument("--data", help="feature job output folder (manifest.json, features/, vocab/)")
    p.add_argument("--split", help="score only this split (default: every row of the input)")
    p.add_argument("--output", help="predictions table (default: <run>/predictions)")
    p.add_argument("--format", choices=list(FORMATS))
    p.add_argument("--version", type=int, help="input table version (default: the manifest's)")
    p.add_argument("--input-table", dest="input_table", help="path or catalog name of a table to score")
    p.add_argument("--raw", action="store_true", default=None, help="input has raw ids: encode first")
    p.add_argument("--device", help="cpu, cuda or auto (executors)")
    p.add_argument("--config", action="append", default=[], help="YAML config file (repeatable)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. score.batch_size=4096")


def config_from_args(args: Any) -> ScoreJobConfig:
    """Files, then flags (as ``score.<flag>=`` overrides), then dotted overrides."""
    flags = [f"score.{n}={getattr(args, n)}" for n in SCORE_FLAGS if getattr(args, n, None) is not None]
    if getattr(args, "raw", None):
        flags.append("score.raw=true")
    return load_score_config(args.config, flags + list(args.overrides))


def cmd_score(args: Any) -> int:
    """Score per parsed arguments; prints the result as JSON."""
    from cvr_spark.spark import get_spark

    cfg = config_from_args(args)
    print(json.dumps(run_score(get_spark(cfg.spark), cfg.score), indent=2, default=str))
    return 0
