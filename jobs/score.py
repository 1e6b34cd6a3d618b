r"""spark-submit entry point of batch scoring; same flags as ``cvr-spark score``.

    spark-submit --packages io.delta:delta-spark_4.1_2.13:4.4.0,io.delta:delta-storage:4.4.0 \
        jobs/score.py --config conf/score.yaml --run runs/aliccp/esmm/seed1 --data out/aliccp \
        --split test --output out/aliccp/predictions score.batch_size=4096

Writes the ``predictions`` table (sample_id, p_ctr, p_cvr, p_ctcvr) as a new version and
prints where, which version and how many rows as JSON.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from cvr_spark.config import ConfigError
from cvr_spark.score import add_score_arguments, cmd_score


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobs/score.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_score_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return cmd_score(args)
    except (ConfigError, ValueError) as e:
        print(f"jobs/score.py: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
