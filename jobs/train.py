r"""spark-submit entry point of training: models x seeds -> checkpoints, test metrics, report.

    spark-submit --packages io.delta:delta-spark_4.1_2.13:4.4.0,io.delta:delta-storage:4.4.0 \
        jobs/train.py --data out/aliccp --model esmm,aitm --seeds 1,2,3 --processes 4 \
        --out runs/aliccp train.patience=2 model.lr=0.002

``--processes > 1`` launches TorchDistributor on the session spark-submit started
(``--no-local-mode``: one Spark task per process on the executors; the run folder must then be
on shared storage). Same options as ``cvr-spark train`` plus the distributor's switches.
"""
from __future__ import annotations

import sys
from typing import Sequence

from cvr_spark.cli import main as cli_main


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
