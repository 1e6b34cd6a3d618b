"""cvr-spark: a Spark + PyTorch pipeline for post-click conversion-rate estimation."""
from setuptools import find_packages, setup

# pyspark and delta-spark are the ``spark`` extra, not hard requirements: a cluster (Databricks,
# a spark-submit image) brings its own pyspark, which installing the wheel must not replace.
# Locally they come with ``.[spark]`` (or ``.[dev]``), pinned as a pair: the Delta jars fetched at run time carry the
# delta-spark version (Maven Central serves delta-spark_4.1_2.13 up to 4.4.0 here; 4.4.1 is
# on PyPI only), so both sides stay on 4.4.0 with pyspark 4.1.1.
INSTALL_REQUIRES = [
    "pyarrow>=15",
    "deltalake>=0.20",
    "numpy>=1.26",
    "pandas>=2.0",
    "omegaconf>=2.3",
    "PyYAML>=6.0",
    "torch>=2.2",
    "scikit-learn>=1.3",
    "tqdm>=4.66",
    "matplotlib>=3.8",
]

SPARK = ["pyspark==4.1.1", "delta-spark==4.4.0"]
# FAISS (the graph job) comes as exactly one of two extras: faiss-cpu and faiss-gpu-cu12 install
# the same ``faiss`` module, so a hard faiss-cpu requirement would clash with the gpu extra.
FAISS_CPU = ["faiss-cpu>=1.8"]

EXTRAS = {
    "spark": SPARK,
    "cpu": FAISS_CPU,
    "gpu": ["faiss-gpu-cu12>=1.8"],
    "petastorm": ["petastorm>=0.12"],
    "mlflow": ["mlflow>=2.10"],
    "dev": SPARK + FAISS_CPU + ["pytest>=8", "pytest-timeout>=2.2"],
}

setup(
    name="cvr-spark",
    version="0.1.0",
    description="Distributed Spark + PyTorch pipeline for post-click CVR estimation",
    # conf/ (stage configs, model presets) ships inside the wheel as cvr_spark/conf, so an
    # installed library (cluster library, --py-files) finds its presets without the repo.
    packages=find_packages(include=["cvr_spark", "cvr_spark.*"]) + ["cvr_spark.conf", "cvr_spark.conf.models"],
    package_dir={"cvr_spark.conf": "conf", "cvr_spark.conf.models": "conf/models"},
    # The raw Ali-CCP line parser's Java source: compiled on first use (cvr_spark.data.jvm_parser).
    package_data={"cvr_spark.conf": ["*.yaml"], "cvr_spark.conf.models": ["*.yaml"],
                  "cvr_spark.data": ["java/*.java"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["cvr-spark=cvr_spark.cli:main"]},
)
