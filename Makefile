# klein-ray: `make demo` and `make test` work on a fresh clone (they create .venv themselves).
# On a machine without a GPU the CPU build of torch is used (TORCH_SPEC); on a GPU machine run
# `make venv TORCH_SPEC=torch` to take PyPI's CUDA build instead.

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
# The Ray nodes' image (infra/Dockerfile); infra/kuberay-rayjob.yaml names the same tag.
IMAGE      ?= ghcr.io/example/klein-ray:0.1.0
BIN        := $(VENV)/bin
APT_PKGS   := radosgw ceph-mon ceph-osd chromium chromium-driver curl g++
SUDO       := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv airflow-venv demo test test-fast lint lint-imports system-deps tiny-model example-manifest image image-check clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
	$(BIN)/pip install -q "$(TORCH_SPEC)" 2>&1 | grep -v '^WARNING: Location' || true
	$(BIN)/pip install -q -e '.[test,bench]' 2>&1 | grep -v '^WARNING: Location' || true
	$(BIN)/python -c "import klein_ray, torch, diffusers, ray, boto3, selenium, moto, importlinter, ruff, mypy"
	touch $@

# Airflow for the scheduler test (tests/test_jobs.py runs jobs/airflow_dag.py with `airflow dags
# test`), in a venv of its own: its pins are not the renderer's.
AIRFLOW_SPEC ?= apache-airflow==3.3.2
AIRFLOW_VENV ?= .venv-airflow

airflow-venv: $(AIRFLOW_VENV)/.installed

$(AIRFLOW_VENV)/.installed:
	$(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
	$(AIRFLOW_VENV)/bin/pip install -q "$(AIRFLOW_SPEC)" 2>&1 | grep -v '^WARNING: Location' || true
	$(AIRFLOW_VENV)/bin/airflow version >/dev/null
	touch $@

# The real S3 server (Ceph RADOS Gateway), the browser and the C++ compiler (torch.compile on CPU)
# the tests use, from Debian packages.
system-deps:
	@missing=""; for t in radosgw ceph-mon ceph-osd chromium chromedriver curl g++; do \
	  command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages for:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(APT_PKGS) >/dev/null; \
	fi

demo: venv
	$(BIN)/klein-ray demo --output demo-output

# The tiers (tests/conftest.py): the fast one needs no Ray, Ceph, browser or process of its own.
SLOW_TIERS := ray or ceph or browser or subprocess or slow

# Lint, type-check and the import contracts; then the fast tier, so a broken unit fails in
# seconds; then every other test.
test: venv airflow-venv system-deps lint
	KLEIN_RAY_TEST_TIER=fast $(BIN)/pytest -q -x -m "not ($(SLOW_TIERS))"
	$(BIN)/pytest -q -m "$(SLOW_TIERS)"

# The fast tier alone (under two minutes on 2 cores): no Ray, Ceph, browser or subprocess.
test-fast: venv lint
	KLEIN_RAY_TEST_TIER=fast $(BIN)/pytest -q -m "not ($(SLOW_TIERS))"

lint: venv lint-imports
	$(BIN)/ruff check klein_ray tests benchmarks jobs
	$(BIN)/mypy

# The package layers and the confinement of ray / torch / boto3 (pyproject.toml's contracts).
lint-imports: venv
	$(BIN)/lint-imports --no-cache

tiny-model: venv
	$(BIN)/klein-ray make-tiny-model .cache/tiny-klein

example-manifest: venv
	$(BIN)/python -c "from pathlib import Path; from klein_ray.commands.demo import write_example; write_example(Path('manifests'))"

# The CUDA image for a cluster's nodes (needs Docker; its Python steps are infra/install.sh's).
image:
	docker build -f infra/Dockerfile -t $(IMAGE) .

# Resolve the image's Python packages as infra/install.sh would, without downloading them
# (needs the package index; the tests never touch the network): a CUDA torch, the pinned Ray.
image-check:
	rm -rf .cache/image-check && mkdir -p .cache/image-check
	PIP_CONFIG_FILE=/dev/null bash infra/install.sh . .cache/image-check/venv --dry-run --quiet \
	  --report .cache/image-check/report.json
	$(PYTHON) -c "import json; r = json.load(open('.cache/image-check/report.json')); \
	  v = {i['metadata']['name'].lower(): i['metadata']['version'] for i in r['install']}; \
	  print('torch', v['torch'], '| ray', v['ray'], '| CUDA runtime:', any(n.startswith('nvidia-cuda-runtime') for n in v))"

clean:
	rm -rf demo-output .pytest_cache $(AIRFLOW_VENV)
