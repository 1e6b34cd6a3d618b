r"""spark-submit entry point of the feature job; same flags as ``cvr-spark features``.

    spark-submit --packages io.delta:delta-spark_4.1_2.13:4.4.0,io.delta:delta-storage:4.4.0 \
        jobs/build_features.py --config conf/features.yaml --input data/aliccp --output out/aliccp
"""
import sys

from cvr_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["features", *sys.argv[1:]]))
