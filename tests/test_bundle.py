"""The Databricks asset bundle (databricks.yml) and the example configs it and spark-submit use.

Every file the bundle names exists in the repository (notebook paths without ``.py``, as
Databricks writes them), every job parameter is a widget of its notebook, every config file a
parameter names loads into its typed schema, and the jobs the project promises are there.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = ROOT / "databricks.yml"
VAR = re.compile(r"\$\{var\.([A-Za-z0-9_]+)\}")


@pytest.fixture(scope="module")
def bundle() -> dict:
    return yaml.safe_load(BUNDLE.read_text())


def _tasks(bundle: dict):
    for name, job in bundle["resources"]["jobs"].items():
        for task in job["tasks"]:
            yield name, job, task


def _widgets(notebook: Path) -> set[str]:
    tree = ast.parse(notebook.read_text())
    return {n.args[0].value for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in ("text", "dropdown")
            and ast.unparse(n.func.value) == "dbutils.widgets"}


def _walk_strings(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _walk_strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk_strings(v)
    elif isinstance(obj, str):
        yield obj


def test_bundle_parses_and_names_its_targets(bundle):
    assert bundle["bundle"]["name"] == "cvr-spark"
    assert bundle["targets"]["dev"]["mode"] == "development" and bundle["targets"]["dev"]["default"] is True
    assert bundle["targets"]["prod"]["mode"] == "production"
    declared = set(bundle["variables"])
    used = {m for s in _walk_strings(bundle) for m in VAR.findall(s)}
    assert used <= declared, f"undeclared variables {used - declared}"
    for target in bundle["targets"].values():
        assert set(target.get("variables", {})) <= declared


def test_graph_tasks_install_faiss_for_their_cluster(bundle):
    """The wheel brings no FAISS (the cpu / gpu extras do): every graph task installs the one
    its GPU cluster needs."""
    graph = [task for _, _, task in _tasks(bundle) if task["notebook_task"]["notebook_path"].endswith("/graph")]
    assert graph
    for task in graph:
        packages = [lib["pypi"]["package"] for lib in task["libraries"] if "pypi" in lib]
        assert task["job_cluster_key"] == "gpu" and [p.split(">")[0] for p in packages] == ["faiss-gpu-cu12"]


def test_wheel_artifact_and_libraries(bundle):
    (artifact,) = bundle["artifacts"].values()
    assert artifact["type"] == "whl" and "bdist_wheel" in artifact["build"]
    src = ROOT / artifact["path"]
    assert (src / "setup.py").is_file()
    wheels = {lib["whl"] for _, _, task in _tasks(bundle) for lib in task.get("libraries", []) if "whl" in lib}
    assert wheels, "job tasks attach the wheel"
    for whl in wheels:  # the build output of the artifact: <path>/dist/*.whl
        assert (ROOT / Path(whl).parent).resolve() == (src / "dist").resolve() and whl.endswith(".whl")


def test_every_notebook_task_points_at_a_notebook_and_its_widgets(bundle):
    seen = set()
    for name, job, task in _tasks(bundle):
        path = task["notebook_task"]["notebook_path"]
        assert not path.endswith(".py"), f"{name}: Databricks names notebooks without the extension"
        notebook = ROOT / f"{path}.py"
        assert notebook.is_file(), f"{name}: {notebook} missing"
        assert notebook.read_text().startswith("# Databricks notebook source\n")
        params = task["notebook_task"].get("base_parameters", {})
        assert set(params) <= _widgets(notebook), f"{name}/{task['task_key']}: not widgets {set(params) - _widgets(notebook)}"
        assert all(isinstance(v, (str, int)) for v in params.values())
        clusters = {c["job_cluster_key"] for c in job.get("job_clusters", [])}
        assert task["job_cluster_key"] in clusters
        for dep in task.get("depends_on", []):
            assert dep["task_key"] in {t["task_key"] for t in job["tasks"]}
        seen.add(Path(path).name)
    assert {"features", "train", "graph", "score"} <= seen


def test_config_files_named_by_jobs_exist_and_load(bundle):
    from cvr_spark.config import load_config
    from cvr_spark.graph.job import GraphJobConfig
    from cvr_spark.score import ScoreJobConfig

    schemas = {"features": None, "graph": GraphJobConfig, "score": ScoreJobConfig}
    checked = 0
    for _, _, task in _tasks(bundle):
        notebook = ROOT / task["notebook_task"]["notebook_path"]
        for key, value in task["notebook_task"].get("base_parameters", {}).items():
            if isinstance(value, str) and value.endswith(".yaml"):
                path = (notebook.parent / value).resolve()  # notebooks run in their own folder
                assert path.is_file(), f"{key}: {path} missing"
                if notebook.name in schemas:
                    schema = schemas[notebook.name]
                    load_config([path], schema=schema) if schema else load_config([path])
                checked += 1
    assert checked >= 4


def test_jobs_promised(bundle):
    jobs = bundle["resources"]["jobs"]
    cron = jobs["graph_refresh"]["schedule"]["quartz_cron_expression"]
    assert re.fullmatch(r"0 \d{1,2} \d{1,2} \* \* \?", cron), f"daily quartz cron expected, got {cron!r}"
    variables = {k: v["default"] for k, v in bundle["variables"].items()}

    def resolve(value):
        return VAR.sub(lambda m: str(variables[m.group(1)]), str(value))

    train = jobs["training"]
    cluster = train["job_clusters"][0]["new_cluster"]
    assert "gpu" in resolve(cluster["spark_version"])
    assert re.match(r"(g\d|p\d|Standard_NC|Standard_ND|a2-)", resolve(cluster["node_type_id"]))
    tasks = {t["task_key"]: t for t in train["tasks"]}
    params = tasks["train"]["notebook_task"]["base_parameters"]
    assert params["use_gpu"] == "true" and int(resolve(params["processes"])) == int(resolve(cluster["num_workers"]))
    # CSTWA's graphs: built by a task the training depends on, in the folder training reads,
    # the same folder the scheduled refresh publishes to.
    assert {"task_key": "graph"} in tasks["train"]["depends_on"]
    graph_out = tasks["graph"]["notebook_task"]["base_parameters"]["output"]
    assert graph_out == params["graphs"] == f"{params['data']}/graphs"
    refresh = jobs["graph_refresh"]["tasks"][0]["notebook_task"]["base_parameters"]
    assert refresh["output"] == graph_out and refresh["data"] == params["data"]


def test_train_yaml_is_valid_run_train_overrides():
    from omegaconf import OmegaConf

    from cvr_spark.models.registry import preset_options
    from cvr_spark.train.experiment import make_train_config, parse_overrides

    options = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "train.yaml"))
    assert set(options) == {"train", "model"}
    train, model = parse_overrides(options)
    cfg = make_train_config(train)
    assert cfg.epochs == options["train"]["epochs"] and cfg.metric_names == ["ctr_auc", "ctcvr_auc"]
    preset_options("esmm", "paper", model)  # model keys are fields of the model configs
    with pytest.raises(ValueError, match="train.epoch"):
        make_train_config({"epoch": 3})


def test_wheel_carries_the_configs_and_presets(tmp_path):
    """The bundle's jobs run the library from its wheel, without the repository: the wheel must
    carry conf/ (stage configs and every registry model's presets) as cvr_spark/conf, and the
    JVM line parser's Java source (compiled where the wheel runs)."""
    import subprocess
    import sys
    import zipfile

    from cvr_spark.models.registry import names

    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    str(ROOT), "-w", str(tmp_path)], check=True, cwd=tmp_path)
    (whl,) = tmp_path.glob("cvr_spark-*.whl")
    inside = set(zipfile.ZipFile(whl).namelist())
    for f in (ROOT / "conf").rglob("*.yaml"):
        assert f"cvr_spark/conf/{f.relative_to(ROOT / 'conf').as_posix()}" in inside
    for name in names():
        assert f"cvr_spark/conf/models/{name.replace('+', '_')}.yaml" in inside
    from cvr_spark.data import jvm_parser

    assert f"cvr_spark/data/java/{jvm_parser.SOURCE.name}" in inside
