"""CSTWA's graph job: CTR pre-training export, FAISS k-NN, sparsify + normalise, graph tables.

Entry points: :func:`cvr_spark.graph.job.run_graph` (the refresh) and
:func:`cvr_spark.graph.store.load_structure_graphs` (reading a pinned version for CSTWA).
"""
