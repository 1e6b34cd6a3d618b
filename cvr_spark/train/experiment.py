"""Experiments: models x seeds -> train (early stopping on valid) -> test metrics -> report.

Layout of ``out_dir``::

    <out>/<model>/seed<k>/checkpoint.pt   last state + best weights (cvr_spark.train.checkpoint)
    <out>/<model>/seed<k>/config.json     job, model options, feature spec, train config
    <out>/<model>/seed<k>/metrics.json    valid (best epoch), history, test, table versions
    <out>/results.*                       the report over every run (cvr_spark.evaluate.report)

Overrides are dotted keys under ``train.`` (fields of :class:`TrainConfig`) or ``model.``
(fields of the model's config dataclass), e.g. ``["train.patience=2", "model.lr=0.01"]``.
MLflow logging (params, per-epoch and test metrics, table versions, run folder) happens on the
driver after each run when ``mlflow`` is importable and ``train.mlflow`` is true (the default);
without mlflow it is skipped silently. The tracking store (``MLFLOW_TRACKING_URI``; MLflow 3's
default is ``sqlite:///mlflow.db`` in the working directory) is opened before the first run.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from cvr_spark.train.loop import TrainConfig, plain

log = logging.getLogger(__name__)

Overrides = Optional[Mapping[str, Any] | Sequence[str]]


def parse_overrides(overrides: Overrides) -> tuple[dict, dict]:
    """Split overrides into (train, model) option dicts.

    Accepts ``"train.epochs=3"`` strings, a mapping of dotted keys to values, or a nested
    mapping ``{"train": {...}, "model": {...}}``. String values are typed by YAML rules.

    Raises:
        ValueError: a malformed override or a section other than ``train`` / ``model``.
    """
    from omegaconf import OmegaConf

    if overrides is None:
        return {}, {}
    if isinstance(overrides, Mapping):
        items = []
        for k, v in overrides.items():
            if isinstance(v, Mapping):
                items += [(f"{k}.{sub}", sv) for sub, sv in v.items()]
            else:
                items.append((str(k), v))
    else:
        items = []
        for ov in overrides:
            if "=" not in ov:
                raise ValueError(f"override '{ov}' is not of the form train.key=value or model.key=value")
            key, text = ov.split("=", 1)
            typed = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]))["v"]  # YAML typing
            items.append((key.strip(), typed))
    out: dict[str, dict] = {"train": {}, "model": {}}
    for key, value in items:
        section, _, name = key.partition(".")
        if section not in out or not name:
            raise ValueError(f"override key '{key}': expected train.<name> or model.<name>")
        out[section][name] = value
    return out["train"], out["model"]


def make_train_config(options: Mapping[str, Any], *, epochs: Optional[int] = None,
                      seed: Optional[int] = None) -> TrainConfig:
    """A TrainConfig from defaults, ``options`` (train overrides) and explicit epochs / seed.

    Raises:
        ValueError: an unknown key or a badly typed value (names the key).
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    values = {k: v for k, v in options.items() if k != "metric_names"}
    if epochs is not None:
        values["epochs"] = int(epochs)
    if seed is not None:
        values["seed"] = int(seed)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), values)
    except OmegaConfBaseException as e:
        raise ValueError(f"train override key 'train.{e.full_key}': {str(e).splitlines()[0]}") from None
    return OmegaConf.to_object(merged)


def load_truth(data_dir: str | Path, manifest: Mapping[str, Any],
               sample_id: np.ndarray) -> Optional[dict[str, np.ndarray]]:
    """The simulator's truth (``p_cvr_true``, ``potential_conversion``) aligned with ``sample_id``.

    The truth table is ``manifest['tables']['truth']`` (path relative to ``data_dir``, format,
    version), keyed by ``sample_id``; None when the manifest names none.

    Raises:
        ValueError: the table lacks ``sample_id`` or rows for some predicted samples.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    from cvr_spark.tables import is_delta, parquet_files

    info = (manifest.get("tables") or {}).get("truth")
    if not info:
        return None
    path = Path(info["path"])
    path = path if path.is_absolute() else Path(data_dir) / path
    fmt = info.get("format") or ("delta" if is_delta(path) else "parquet")
    files = [f.removeprefix("file://") for f in parquet_files(path, fmt, info.get("version"))]
    data = ds.dataset(files, format="parquet")
    # The simulator's truth table names the true post-click probability ``p_cvr``.
    true_col = "p_cvr_true" if "p_cvr_true" in data.schema.names else "p_cvr"
    cols = [c for c in (true_col, "potential_conversion") if c in data.schema.names]
    if "sample_id" not in data.schema.names or not cols:
        raise ValueError(f"truth table {path}: expected columns sample_id and p_cvr_true / "
                         f"potential_conversion, found {data.schema.names}")
    if "split" in data.schema.names:
        # The simulator keys its truth by the raw files' ids and names the file (train / test);
        # the feature job shifts ids per input split (SAMPLE_ID_OFFSET: train and test raw ids
        # overlap in Ali-CCP), so the truth is shifted the same way before matching.
        from cvr_spark.data.sources import SAMPLE_ID_BITS, SAMPLE_ID_OFFSET

        parts = []
        for split, offset in SAMPLE_ID_OFFSET.items():
            wanted = sample_id[(sample_id >= offset) & (sample_id < offset + (1 << SAMPLE_ID_BITS))] - offset
            if len(wanted):
                part = data.to_table(columns=["sample_id", *cols], filter=(pc.field("split") == split)
                                     & pc.field("sample_id").isin(wanted))
                parts.append(part.set_column(0, "sample_id", pc.add(part.column("sample_id"), offset)))
        table = pa.concat_tables(parts) if parts else data.schema.empty_table().select(["sample_id", *cols])
    else:
        table = data.to_table(columns=["sample_id", *cols], filter=pc.field("sample_id").isin(sample_id))
    ids = table.column("sample_id").to_numpy()
    order = np.argsort(ids, kind="stable")
    pos = np.searchsorted(ids[order], sample_id).clip(0, max(len(ids) - 1, 0))
    found = len(ids) > 0 and (ids[order][pos] == sample_id).all()
    if not found:
        raise ValueError(f"truth table {path}: no row for {int((ids[order][pos] != sample_id).sum()) if len(ids) else len(sample_id)} "
                         "predicted sample_id(s)")
    names = {true_col: "p_cvr_true", "potential_conversion": "potential_conversion"}
    return {names[c]: table.column(c).to_numpy()[order][pos].astype(np.float64) for c in cols}


def _check_spec(saved: Any, current: Any, data_dir: str | Path) -> None:
    for attr in ("sparse_fields", "sparse_vocab", "multi_fields", "multi_vocab", "dense_fields"):
        if tuple(getattr(saved, attr)) != tuple(getattr(current, attr)):
            raise ValueError(f"{Path(data_dir) / 'manifest.json'}: '{attr}' is {getattr(current, attr)} but the "
                             f"checkpoint was trained with {getattr(saved, attr)}; evaluate on the same features")


def _trained_version(state: Mapping[str, Any], data_dir: str | Path) -> Optional[int]:
    """The features table version a run trained on, when ``data_dir`` is the folder it trained
    from (a rebuilt table may re-index the vocabulary: the run's ids mean the old version's);
    None (the manifest's version) for another folder or a checkpoint that does not say."""
    job = (state.get("meta") or {}).get("job") or {}
    trained = job.get("version")
    if trained is None:
        trained = (state.get("table_versions") or {}).get("train")
    same = job.get("data_dir") is not None and Path(job["data_dir"]).resolve() == Path(data_dir).resolve()
    if not same:
        if job.get("data_dir") is not None:
            log.warning("evaluating on %s, not the run's training data %s: reading the version its "
                        "manifest names", data_dir, job["data_dir"])
        return None
    return None if trained is None else int(trained)


def evaluate_run(target: str | Path, data_dir: str | Path, split: str = "test", *,
                 device: str = "auto", batch_size: int = 8192) -> dict:
    """Metrics of a run's best weights on ``split``; merged into the run's ``metrics.json``.

    Args:
        target: a run folder (holding ``checkpoint.pt``) or a checkpoint file.
        data_dir: the feature job's output (manifest + features table). When it is the folder
            the run trained from, the features table is read at the version the run trained on.

    Returns:
        ``model``, ``seed``, ``split``, ``metrics``, ``table_version``, ``truth_available``.

    Raises:
        FileNotFoundError: no checkpoint. ValueError: features differ from the trained ones.
    """
    from cvr_spark.evaluate.metrics import compute_metrics
    from cvr_spark.models import registry
    from cvr_spark.models.base import FeatureSpec
    from cvr_spark.train.checkpoint import load_checkpoint
    from cvr_spark.train.distributed import attach_graphs, spec_from_dict
    from cvr_spark.train.loader import FeatureLoader, load_manifest
    from cvr_spark.train.loop import predict, resolve_device, write_json

    target = Path(target)
    run_dir = target if target.is_dir() else target.parent
    state = load_checkpoint(target)
    meta, manifest = state["meta"], load_manifest(data_dir)
    spec = spec_from_dict(meta["spec"])
    _check_spec(spec, FeatureSpec.from_manifest(manifest), data_dir)
    model = registry.build(meta["model_name"], spec, meta["model_options"])
    model.load_state_dict(state["best_model"] if state.get("best_model") is not None else state["model"])
    dev = resolve_device(device)
    job = meta.get("job", {})
    attach_graphs(model.to(dev), data_dir, job.get("graph_dir"), job.get("graph_version"))
    loader = FeatureLoader(str(data_dir), split, batch_size, shuffle=False, spec=spec, device=dev,
                           version=_trained_version(state, data_dir))
    pred = predict(model, loader, dev)
    truth = load_truth(data_dir, manifest, pred["sample_id"])
    metrics = plain(compute_metrics(pred, cvr_key=model.cvr_output, ctcvr_key=model.ctcvr_output, truth=truth))
    seed = meta.get("job", {}).get("seed")
    path = run_dir / "metrics.json"
    record = json.loads(path.read_text()) if path.is_file() else {"model": meta["model_name"], "seed": seed}
    record[split] = metrics
    record.setdefault("table_versions", dict(state.get("table_versions") or {}))[split] = loader.table_version
    write_json(path, record)
    return {"model": meta["model_name"], "seed": seed, "split": split, "metrics": metrics,
            "table_version": loader.table_version, "truth_available": truth is not None}


def _mlflow_tracker(enabled: bool) -> Any:
    """The ``mlflow`` module when runs are to be logged (``train.mlflow`` and mlflow importable),
    else None. Its tracking store is opened here, before any training, so that a store that
    cannot be used fails the experiment at once instead of after its first run.

    Raises:
        RuntimeError: mlflow is installed but its tracking store cannot be opened (names the URI).
    """
    if not enabled:
        return None
    try:
        import mlflow
    except ImportError:
        return None
    uri = mlflow.get_tracking_uri()
    try:
        mlflow.MlflowClient().search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - any store error: report it with the way out
        raise RuntimeError(
            f"mlflow is installed but its tracking store {uri!r} cannot be used ({type(err).__name__}: "
            f"{err}); set MLFLOW_TRACKING_URI (e.g. sqlite:///mlflow.db or a tracking server) or turn "
            "run logging off with train.mlflow=false") from err
    return mlflow


def _log_mlflow(mlflow: Any, run: Mapping[str, Any], run_dir: Path) -> None:
    """Log one finished run to MLflow (called on the driver only: one writer per run): the
    model and train options as params, the validation history and the test metrics, the
    feature table versions as tags, the run folder as artifacts."""
    record = json.loads((run_dir / "metrics.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    with mlflow.start_run(run_name=f"{run['model']}-seed{run['seed']}"):
        params = {f"model.{k}": v for k, v in config["model_options"].items()}
        params.update({f"train.{k}": v for k, v in config["train"].items()})
        mlflow.log_params({k: str(v) for k, v in params.items()})
        for h in record.get("history", []):
            mlflow.log_metrics({"train_loss": h["train_loss"], "valid_score": h["score"]}, step=h["epoch"])
        scalars = {f"test_{k}": float(v) for k, v in run["metrics"].items()
                   if isinstance(v, (int, float)) and math.isfinite(float(v))}
        mlflow.log_metrics(scalars)
        mlflow.set_tags({f"table_version.{k}": str(v) for k, v in record.get("table_versions", {}).items()})
        mlflow.log_artifacts(str(run_dir))


def run_train(data_dir: str | Path, models: Sequence[str], seeds: Sequence[int], preset: str = "paper",
              epochs: Optional[int] = None, processes: int = 1, out_dir: str | Path = "runs",
              overrides: Overrides = None, *, use_gpu: Optional[bool] = None, local_mode: bool = True,
              graph_dir: Optional[str | Path] = None, graph_version: Optional[int] = None) -> dict:
    """Train every model with every seed, evaluate each run's best weights on test, write the report.

    Args:
        data_dir: the feature job's output. models: registry names. seeds: one run per seed.
        preset: block of ``conf/models/<name>.yaml``. epochs: overrides ``train.epochs``.
        processes: ranks per run (1: in this process; more: TorchDistributor).
        overrides: ``train.*`` / ``model.*`` dotted overrides (see :func:`parse_overrides`).
        use_gpu: default: whether CUDA is available here.
        graph_dir: the graph job's output for graph models (default ``<data_dir>/graphs``).
        graph_version: pin a graph version (default: the current one when training starts).

    Returns:
        ``out_dir``, ``runs`` (one evaluate_run result + ``run_dir`` per run), ``report``.
    """
    import torch

    from cvr_spark.evaluate.report import write_report
    from cvr_spark.models.base import FeatureSpec
    from cvr_spark.models.registry import preset_options
    from cvr_spark.train.distributed import graph_dir_for, needs_graphs, pin_graph_version, train_distributed
    from cvr_spark.train.loader import load_manifest, loader_class

    train_over, model_over = parse_overrides(overrides)
    for what, values in (("model", models), ("seed", seeds)):  # a repeat would resume its twin's run
        twice = sorted({str(v) for v in values if list(values).count(v) > 1})
        if twice:
            raise ValueError(f"{what}(s) {twice} given more than once; each (model, seed) is one run")
    if not models or not seeds:
        raise ValueError(f"nothing to train: models {list(models)}, seeds {list(seeds)}")
    # Everything that can be checked is checked before the first run trains.
    FeatureSpec.from_manifest(load_manifest(data_dir))
    all_options = {name: preset_options(name, preset, model_over) for name in models}
    base_cfg = make_train_config(train_over, epochs=epochs)
    loader_class(base_cfg.loader)  # a missing optional reader fails here, not in the first run
    tracker = _mlflow_tracker(base_cfg.mlflow)
    here = torch.cuda.is_available()
    use_gpu = here if use_gpu is None else bool(use_gpu)
    if use_gpu and not here and (processes == 1 or local_mode):
        raise ValueError("use_gpu is set but this machine has no CUDA device (torch.cuda.is_available() is "
                         "false); train without --use-gpu, or on GPU workers with --processes N --no-local-mode")
    eval_device = "cuda" if use_gpu and here else "cpu"  # cluster mode: the driver may have no GPU
    out, results = Path(out_dir).resolve(), []
    for name in models:
        options = all_options[name]
        for seed in seeds:
            cfg = make_train_config(train_over, epochs=epochs, seed=seed)
            job = {"data_dir": str(Path(data_dir).resolve()), "model": name, "preset": preset,
                   "seed": int(seed), "out_dir": str(out / name / f"seed{seed}"),
                   "model_options": plain(options), "train": plain(dataclasses.asdict(cfg))}
            if needs_graphs(options):
                where = graph_dir_for(data_dir, graph_dir).resolve()
                job.update(graph_dir=str(where), graph_version=pin_graph_version(where, graph_version))
            run_dir = Path(train_distributed(job, processes, use_gpu, local_mode))
            result = evaluate_run(run_dir, data_dir, "test", device=eval_device)
            results.append({**result, "run_dir": str(run_dir)})
            if tracker is not None:
                _log_mlflow(tracker, result, run_dir)
            log.info("%s seed %d: test %s", name, seed,
                     {k: result["metrics"].get(k) for k in ("ctr_auc", "cvr_auc_clicked", "ctcvr_auc")})
    runs = [{"model": r["model"], "seed": r["seed"], "metrics": r["metrics"]} for r in results]
    report = write_report(runs, out, truth_available=any(r["truth_available"] for r in results))
    return {"out_dir": str(out), "runs": results, "report": plain(report)}


def run_evaluate(target: str | Path, data_dir: str | Path, split: str = "test") -> dict:
    """Evaluate a run folder or checkpoint on ``split`` of ``data_dir`` (see :func:`evaluate_run`)."""
    return evaluate_run(target, data_dir, split)
