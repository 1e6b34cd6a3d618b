r"""spark-submit entry point of the graph job (CSTWA user/item similarity graphs).

    spark-submit --packages io.delta:delta-spark_4.1_2.13:4.4.0,io.delta:delta-storage:4.4.0 \
        jobs/build_graph.py --config conf/graph.yaml --data out/aliccp --pretrain --k 8 --output out/aliccp/graphs
    # or: --ctr-checkpoint runs/ctr/seed0 ; dotted overrides: graph.include_self=false
"""
import sys

from cvr_spark.graph.job import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
