"""spark-submit entry point of evaluation: a trained run's best weights on one split.

    spark-submit jobs/evaluate.py --run runs/aliccp/esmm/seed1 --data out/aliccp --split test

Prints the metrics as JSON and merges them into ``<run>/metrics.json``. Runs in the driver
process (no Spark work is needed: the loader reads the table's Parquet files directly).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jobs/evaluate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run folder (<out>/<model>/seed<k>) or checkpoint file")
    p.add_argument("--data", required=True, help="feature job output folder (has manifest.json)")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cvr_spark.train.experiment import run_evaluate

    print(json.dumps(run_evaluate(args.run, args.data, args.split), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
