# Two commands for a new user: `make demo` and `make test`. Each creates or refreshes .venv.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
PY := $(VENV)/bin/python
RUN_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: demo test bench venv clean

venv: $(STAMP)

$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,ann,bench]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/landmarks-demo --run_dir $(RUN_DIR)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/bench_normalise.py
	$(PY) bench/bench_ingest_archives.py
	$(PY) bench/bench_input_pipeline.py
	$(PY) bench/bench_verification.py
	$(PY) bench/bench_crop_voting.py
	$(PY) bench/bench_train_step.py
	$(PY) bench/bench_knn_exact.py
	$(PY) bench/bench_knn_approximate.py
	@test -f $(RUN_DIR)/reference_features/_SUCCESS || $(MAKE) demo
	$(PY) bench/bench_query.py --run_dir $(RUN_DIR)
	$(PY) bench/bench_query.py --run_dir $(RUN_DIR) --image_size 299

clean:
	rm -rf $(VENV) runs .pytest_cache
