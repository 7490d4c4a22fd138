"""The deployment files agree with each other and with the code: the KubeRay manifest runs the
image the Dockerfile builds (same tag as the Makefile's, Ray as pinned), its entrypoint parses
with klein-ray's own parser, the config it names is mounted from the ConfigMap it defines (the
job config in jobs/, valid); the Dockerfile installs Python packages only through
infra/install.sh, laid out on exactly the files the Dockerfile copies; the Airflow
DAG calls the real submit script with flags it has and retries only on exit 75."""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import sys
import types
from pathlib import Path

import pytest
import tomllib
import yaml

from klein_ray.cli import _parser
from klein_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "infra" / "Dockerfile"
RAYJOB = REPO / "infra" / "kuberay-rayjob.yaml"


def _docs() -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(RAYJOB.read_text())}


def _containers(rayjob: dict) -> list[dict]:
    spec = rayjob["spec"]["rayClusterSpec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")))
    return [tuple(line.strip().split(None, 1)) for line in text.splitlines() if line.strip()]


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _makefile_var(name: str) -> str:
    return re.search(rf"^{name}\s*\?=\s*(\S+)", (REPO / "Makefile").read_text(), re.M).group(1)


def _ray_pin() -> str:
    deps = _pyproject()["project"]["dependencies"]
    return next(re.fullmatch(r"ray\[default\]==(\S+)", d).group(1) for d in deps if d.startswith("ray"))


def test_the_manifest_runs_the_image_the_dockerfile_builds_with_the_pinned_ray():
    image = _makefile_var("IMAGE")
    assert f"-t {image} ." in DOCKERFILE.read_text(), "the Dockerfile documents another tag"
    assert image.endswith(":" + _pyproject()["project"]["version"])
    rayjob = _docs()["RayJob"]
    assert {c["image"] for c in _containers(rayjob)} == {image}
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == _ray_pin()


def test_the_entrypoint_is_a_render_our_cli_accepts():
    argv = shlex.split(_docs()["RayJob"]["spec"]["entrypoint"])
    assert argv[0] == "klein-ray" and _pyproject()["project"]["scripts"]["klein-ray"] == "klein_ray.__main__:entry"
    args = _parser().parse_args(argv[1:])
    assert args.command == "render" and args.no_progress
    assert args.address is None  # the driver joins the job's cluster through RAY_ADDRESS
    assert args.executor == "ray"
    assert args.manifest.startswith("s3://") and args.output.startswith("s3://")  # every node sees them


def test_a_stopped_job_gets_the_same_time_to_finish_as_through_submit_py():
    env = yaml.safe_load(_docs()["RayJob"]["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env["RAY_JOB_STOP_WAIT_TIME_S"] == str(_load_submit().JOB_STOP_WAIT_S)


def test_the_config_it_names_is_mounted_from_the_configmap_it_defines(tmp_path):
    docs = _docs()
    config = Path(_parser().parse_args(shlex.split(docs["RayJob"]["spec"]["entrypoint"])[1:]).config)
    head = docs["RayJob"]["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for m in head["containers"][0]["volumeMounts"] if m["mountPath"] == str(config.parent))
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    configmap = docs["ConfigMap"]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    text = configmap["data"][config.name]
    # The ConfigMap carries jobs/klein-4b.yaml, and klein-ray accepts it.
    assert yaml.safe_load(text) == yaml.safe_load((REPO / "jobs" / "klein-4b.yaml").read_text())
    (tmp_path / config.name).write_text(text)
    assert load_config(tmp_path / config.name).default_variant == "klein-4b"


def test_the_dockerfile_installs_python_packages_only_through_install_sh():
    steps = _instructions()
    assert steps[0][0] == "FROM" and steps[0][1].startswith("nvidia/cuda:")
    runs = [arg for op, arg in steps if op == "RUN"]
    installs = [r for r in runs if "infra/install.sh" in r]
    assert len(installs) == 1
    outside = [r for r in runs if re.search(r"\bpip\b|\buv\b|\bconda\b", r)]
    assert not outside, f"an install step outside install.sh: {outside}"
    script, src, venv = shlex.split(installs[0])[1:4]
    copies = [shlex.split(arg) for op, arg in steps if op == "COPY"]
    assert ["infra/install.sh", script] in copies
    assert ["pyproject.toml", "README.md", src + "/"] in copies  # what setuptools needs to build
    path = next(arg for op, arg in steps if op == "ENV" and arg.startswith("PATH="))
    assert path.startswith(f"PATH={venv}/bin:")  # `klein-ray` and `ray` of the venv, for KubeRay too
    assert "wget" in " ".join(runs)  # KubeRay's probes run wget in the container


def test_install_sh_takes_the_torch_the_makefile_tests_with():
    default = re.search(r"TORCH_SPEC=\$\{TORCH_SPEC:-([^}]+)\}", (REPO / "infra" / "install.sh").read_text())
    assert default and default.group(1) == _makefile_var("TORCH_SPEC")


def _docker_context(root: Path) -> tuple[list[str], Path]:
    """Lay out the Dockerfile's COPYs under ``root`` and return its install RUN with every
    absolute path moved under ``root`` too (the image's filesystem, in a directory)."""
    for op, arg in _instructions():
        if op == "COPY":
            *sources, dest = shlex.split(arg)
            for source in sources:
                target = root / dest.lstrip("/")
                target = target / Path(source).name if dest.endswith("/") else target
                target.parent.mkdir(parents=True, exist_ok=True)
                copy = shutil.copytree if (REPO / source).is_dir() else shutil.copy2
                copy(REPO / source, target, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                                if (REPO / source).is_dir() else {}))
    run = next(arg for op, arg in _instructions() if op == "RUN" and "infra/install.sh" in arg)
    argv = [str(root / a.lstrip("/")) if a.startswith("/") else a for a in shlex.split(run)]
    return argv, Path(argv[3])


def test_install_sh_installs_from_exactly_what_the_dockerfile_copies(tmp_path):
    """The image's install step, laid out as the Dockerfile lays it out: the script and the
    project it installs are there, whole. (Resolving the image's packages needs the package
    index: `make image-check` does it, outside the tests, which never touch the network.)"""
    argv, venv = _docker_context(tmp_path / "image")
    script, src = Path(argv[0] if argv[0].endswith("install.sh") else argv[1]), Path(argv[2])
    assert script.is_file() and script.read_text() == (REPO / "infra" / "install.sh").read_text()
    for part in ("pyproject.toml", "README.md", "klein_ray/__init__.py", "klein_ray/cli/__init__.py"):
        assert (src / part).is_file(), f"the image's project lacks {part}"
    assert venv.is_relative_to(tmp_path / "image")


def test_readme_names_only_deployment_files_that_exist():
    readme = (REPO / "README.md").read_text()
    named = set(re.findall(r"\b((?:jobs|infra)/[\w./-]+\.(?:py|sh|yaml|yml|Dockerfile))\b", readme))
    named |= {"infra/Dockerfile"} if "infra/Dockerfile" in readme else set()
    assert {"jobs/submit.py", "jobs/airflow_dag.py", "infra/kuberay-rayjob.yaml", "infra/Dockerfile"} <= named
    assert [n for n in sorted(named) if not (REPO / n).exists()] == []


# --- the Airflow DAG, with stand-ins for Airflow (not installed here) ---------------------------

class _Task:
    def __init__(self, fn):
        self.function, self.calls = fn, []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)


def _load_dag(monkeypatch):
    airflow = types.ModuleType("airflow")
    exceptions = types.ModuleType("airflow.exceptions")
    exceptions.AirflowException = type("AirflowException", (Exception,), {})
    exceptions.AirflowFailException = type("AirflowFailException", (exceptions.AirflowException,), {})
    sdk = types.ModuleType("airflow.sdk")
    sdk.tasks = []
    sdk.dag = lambda **kw: (lambda fn: fn)
    sdk.task = lambda **kw: (lambda fn: sdk.tasks.append(_Task(fn)) or sdk.tasks[-1])
    for name, module in {"airflow": airflow, "airflow.exceptions": exceptions, "airflow.sdk": sdk}.items():
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location("airflow_dag", REPO / "jobs" / "airflow_dag.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, exceptions, sdk.tasks


def _load_submit():
    spec = importlib.util.spec_from_file_location("klein_submit", REPO / "jobs" / "submit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_dag_runs_the_real_submit_script_with_flags_it_has(monkeypatch):
    dag, _, tasks = _load_dag(monkeypatch)
    assert dag.SUBMIT == REPO / "jobs" / "submit.py"  # beside the DAG, as deployed
    cmd = dag.submit_command("s3://b/m/", "s3://b/out", extra=("--verify",))
    assert cmd[:2] == [dag.PYTHON, str(dag.SUBMIT)]
    args = _load_submit().parse_args(cmd[2:])
    assert (args.manifest, args.output, args.address, args.config) == (
        "s3://b/m/", "s3://b/out", dag.DASHBOARD, dag.CONFIG)
    assert args.render_args == ["--verify"]
    (render,) = tasks  # the DAG wires one render per day, its paths templated by the date
    assert render.calls == [{"manifest": "{{ params.manifest_root }}/{{ ds }}/",
                             "output": "{{ params.output_root }}/{{ ds }}"}]


@pytest.mark.subprocess
@pytest.mark.parametrize("code", [0, 1, 2, 75, 130, 137])
def test_the_dag_retries_only_on_exit_75(monkeypatch, tmp_path, code):
    dag, exc, _ = _load_dag(monkeypatch)
    fake = tmp_path / "submit.py"  # stands in for jobs/submit.py: a log, the summary, the code
    fake.write_text("import sys\nprint('klein-ray: a log line')\n"
                    f"print('{{\"committed\": 3}}')\nsys.exit({code})\n")
    cmd = [sys.executable, str(fake)]
    if code == 0:
        assert dag.run_submit(cmd) == {"committed": 3}
        return
    with pytest.raises(exc.AirflowException) as raised:
        dag.run_submit(cmd)
    # AirflowFailException fails the task for good; a plain AirflowException uses its retries.
    assert isinstance(raised.value, exc.AirflowFailException) == (code != 75)
