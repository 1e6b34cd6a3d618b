"""spark-submit entry point of evaluation: a trained run's best weights on one split.

    spark-submit jobs/evaluate.py --run runs/aliccp/esmm/seed1 --data out/aliccp --split test

Prints the metrics as JSON and merges them into ``<run>/metrics.json``. Runs in the driver
process (no Spark work is needed: the loader reads the table's Parquet files directly).
"""
from __future__ import annotations

import sys
from typing import Sequence

from cvr_spark.cli import main as cli_main


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(["evaluate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
