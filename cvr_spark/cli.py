"""The ``cvr-spark`` command: one subcommand per stage, each a thin call into the library.

The Spark stages (features, simulate, demo, graph, score) accept ``--config FILE`` (repeatable
YAML) and trailing dotted overrides (``features.min_count=5 spark.master=local[2]``); their flags
are shorthands for those overrides. ``train`` takes ``train.<key>=v`` / ``model.<key>=v`` overrides.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable, Sequence

from cvr_spark.config import Config, ConfigError, load_config
from cvr_spark.data.features import AccountingError

# Errors that report bad input or options (their messages name the file, key or value): printed
# as one line with exit status 2; anything else keeps its traceback.
USER_ERRORS = (FileNotFoundError, NotADirectoryError, ValueError, KeyError, FloatingPointError, AccountingError,
               ImportError)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", action="append", default=[], help="YAML config file (repeatable)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. spark.master=local[2]")


def _flag_overrides(args: argparse.Namespace, section: str, names: Sequence[str]) -> list[str]:
    out = []
    for n in names:
        v = getattr(args, n, None)
        if v is not None:
            out.append(f"{section}.{n}={v}")
    return out


def _load(args: argparse.Namespace, section: str, names: Sequence[str]) -> Config:
    return load_config(args.config, _flag_overrides(args, section, names) + list(args.overrides))


FEATURE_FLAGS = ("source", "input", "output", "fields", "min_count", "format", "valid_fraction",
                 "seed", "test_input", "split_column", "max_reject_fraction", "parser")
SIM_FLAGS = ("output", "rows", "seed", "preset")


def cmd_features(args: argparse.Namespace) -> int:
    from cvr_spark.data.features import run_features
    from cvr_spark.demo import summarize_manifest
    from cvr_spark.spark import get_spark

    cfg = _load(args, "features", FEATURE_FLAGS)
    manifest = run_features(get_spark(cfg.spark), cfg.features)
    print(summarize_manifest(manifest))
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from cvr_spark.data.simulator import simulate
    from cvr_spark.spark import get_spark

    cfg = _load(args, "simulate", SIM_FLAGS)
    summary = simulate(get_spark(cfg.spark), cfg.simulate)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from cvr_spark.models.registry import describe

    for row in describe():
        opts = ", ".join(f"{k}={v}" for k, v in row["options"].items())
        print(f"{row['name']:<14} | {row['paper']} | outputs: {', '.join(row['outputs'])} "
              f"(CVR: {row['cvr_output']}, CTCVR: {row['ctcvr_output']}) | options: {opts}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from cvr_spark.demo import run_demo

    cfg = load_config(args.config, list(args.overrides))
    run_demo(cfg, out_dir=args.out, rows=args.rows, rebuild=args.rebuild, preset=args.preset)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cvr-spark", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("features", help="raw input -> vocab, features, rejects tables + manifest")
    p.add_argument("--source", choices=["aliccp-raw", "aitm-csv", "rechub-csv", "paddle-joined",
                                        "aliexpress-csv"])
    p.add_argument("--input", help="input file or folder (aliccp-raw: the folder of the 4 raw files)")
    p.add_argument("--test-input", dest="test_input")
    p.add_argument("--output", help="output folder: features/, vocab/, rejects/, manifest.json")
    p.add_argument("--fields", choices=["aitm18", "full"])
    p.add_argument("--min-count", dest="min_count", type=int)
    p.add_argument("--format", choices=["delta", "parquet"])
    p.add_argument("--valid-fraction", dest="valid_fraction", type=float)
    p.add_argument("--split-column", dest="split_column")
    p.add_argument("--max-reject-fraction", dest="max_reject_fraction", type=float)
    p.add_argument("--parser", choices=["auto", "jvm", "sql"],
                   help="raw Ali-CCP line parser: the JVM UDF (compiled on first use) or Spark SQL")
    p.add_argument("--seed", type=int)
    _common(p)
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("simulate", help="simulated raw Ali-CCP files + truth table")
    p.add_argument("--output")
    p.add_argument("--rows", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--preset", choices=["default", "small"])
    _common(p)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("models", help="print the model registry")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("demo", help="simulate -> features -> graphs -> train -> evaluate, on the embedded default")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--rows", type=int, default=None)
    p.add_argument("--rebuild", action="store_true", help="rebuild every stage even if present")
    p.add_argument("--preset", choices=["default", "small"], default=None,
                   help="simulator preset (default: small); simulate.<knob>=v overrides apply on top")
    _common(p)
    p.set_defaults(func=cmd_demo)
    _add_train_commands(sub)
    _add_graph_and_score_commands(sub)
    return parser


def _add_train_commands(sub) -> None:
    p = sub.add_parser("train", help="train models x seeds on a feature table; writes a report")
    p.add_argument("--data", required=True, help="feature job output folder (has manifest.json)")
    p.add_argument("--model", required=True, type=_names, help="registry name(s), comma-separated")
    p.add_argument("--preset", default="paper", help="block of conf/models/<model>.yaml (paper, fast)")
    p.add_argument("--epochs", type=int, default=None, help="default: train.epochs (10)")
    p.add_argument("--seeds", default=[1], type=_seeds, help="comma-separated seeds, one run each")
    p.add_argument("--processes", type=int, default=1, help="ranks per run (1: in this process, "
                   "more: TorchDistributor)")
    p.add_argument("--out", required=True, help="run folder root (<out>/<model>/seed<k>)")
    p.add_argument("--graphs", default=None, help="graph job output for graph models such as CSTWA "
                   "(default: <data>/graphs)")
    p.add_argument("--graph-version", dest="graph_version", type=int, default=None,
                   help="pin a graph version (default: the current one)")
    p.add_argument("--use-gpu", dest="use_gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="default: whether this driver sees a CUDA device")
    p.add_argument("--local-mode", dest="local_mode", action=argparse.BooleanOptionalAction, default=True,
                   help="TorchDistributor local_mode (processes on the driver; --no-local-mode: one "
                   "Spark task per process on the executors, run folder on shared storage)")
    p.add_argument("overrides", nargs="*", help="dotted overrides: train.<key>=v or model.<key>=v")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a trained run on a split")
    p.add_argument("--run", required=True, help="run folder (<out>/<model>/seed<k>) or checkpoint")
    p.add_argument("--data", required=True, help="feature job output folder (has manifest.json)")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.set_defaults(func=cmd_evaluate)


def _add_graph_and_score_commands(sub) -> None:
    from cvr_spark.graph.job import add_graph_arguments, cmd_graph
    from cvr_spark.score import add_score_arguments, cmd_score

    p = sub.add_parser("graph", help="pre-trained CTR embeddings -> FAISS user/item graphs for CSTWA")
    add_graph_arguments(p)
    p.set_defaults(func=cmd_graph)

    p = sub.add_parser("score", help="score a features table with a trained run -> predictions table")
    add_score_arguments(p)
    p.set_defaults(func=cmd_score)


def _names(text: str) -> list[str]:
    """``--model``: comma-separated registry names."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"no model name in {text!r}")
    return names


def _seeds(text: str) -> list[int]:
    """``--seeds``: comma-separated integers."""
    parts = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in parts if not s.lstrip("-").isdigit()]
    if bad or not parts:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 1,2,3; got {text!r}")
    return [int(s) for s in parts]


def cmd_train(args: argparse.Namespace) -> int:
    from cvr_spark.train.experiment import run_train

    if args.processes > 1:  # TorchDistributor runs on the active (spark-submit's) or a local session
        from cvr_spark.spark import get_spark

        get_spark()
    result = run_train(
        args.data, args.model, args.seeds, args.preset, args.epochs,
        args.processes, args.out, overrides=list(args.overrides), use_gpu=args.use_gpu,
        local_mode=args.local_mode, graph_dir=args.graphs, graph_version=args.graph_version,
    )
    print(json.dumps(result, indent=2, default=str))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cvr_spark.train.experiment import run_evaluate

    print(json.dumps(run_evaluate(args.run, args.data, args.split), indent=2, default=str))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as e:
        print(f"cvr-spark: config error: {e}", file=sys.stderr)
        return 2
    except USER_ERRORS as e:  # bad input or options: the message names them (-v: the traceback)
        if args.verbose:
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"cvr-spark {args.command}: {type(e).__name__}: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
