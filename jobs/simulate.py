r"""spark-submit entry point of the simulator; same flags as ``cvr-spark simulate``.

    spark-submit --packages io.delta:delta-spark_4.1_2.13:4.4.0,io.delta:delta-storage:4.4.0 \
        jobs/simulate.py --output data/sim --rows 100000000 --preset default
"""
import sys

from cvr_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["simulate", *sys.argv[1:]]))
