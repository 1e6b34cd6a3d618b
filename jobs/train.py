"""spark-submit entry point of training: models x seeds -> checkpoints, test metrics, report.

    spark-submit --packages io.delta:delta-spark_4.1_2.13:4.4.0,io.delta:delta-storage:4.4.0 \
        jobs/train.py --data out/aliccp --model esmm,aitm --seeds 1,2,3 --processes 4 \
        --out runs/aliccp train.patience=2 model.lr=0.002

``--processes > 1`` launches TorchDistributor on the session spark-submit started
(``--no-local-mode``: one Spark task per process on the executors; the run folder must then be
on shared storage). Same options as ``cvr-spark train`` plus the distributor's switches.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jobs/train.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="feature job output folder (has manifest.json)")
    p.add_argument("--model", required=True, help="registry name(s), comma-separated")
    p.add_argument("--preset", default="paper", help="block of conf/models/<model>.yaml")
    p.add_argument("--epochs", type=int, default=None, help="default: train.epochs (10)")
    p.add_argument("--seeds", default="1", help="comma-separated seeds, one run each")
    p.add_argument("--processes", type=int, default=1, help="ranks per run (1: no Spark)")
    p.add_argument("--out", required=True, help="run folder root")
    p.add_argument("--use-gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="default: whether this driver sees a CUDA device")
    p.add_argument("--local-mode", action=argparse.BooleanOptionalAction, default=True,
                   help="TorchDistributor local_mode (processes on the driver)")
    p.add_argument("overrides", nargs="*", help="dotted overrides: train.<key>=v or model.<key>=v")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from cvr_spark.train.experiment import run_train

    if args.processes > 1:  # TorchDistributor needs the session spark-submit configured
        from cvr_spark.spark import get_spark

        get_spark()
    result = run_train(args.data, [m.strip() for m in args.model.split(",") if m.strip()],
                       [int(s) for s in args.seeds.split(",") if s.strip()], args.preset, args.epochs,
                       args.processes, args.out, list(args.overrides), use_gpu=args.use_gpu,
                       local_mode=args.local_mode)
    print(json.dumps({"out_dir": result["out_dir"], "report": result["report"],
                      "runs": [{k: r[k] for k in ("model", "seed", "run_dir")} for r in result["runs"]]},
                     indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
