# Two commands for a new user: `make demo` and `make test`. Each creates or refreshes .venv.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
PY := $(VENV)/bin/python
RUN_DIR ?= runs/demo
PYTEST_ARGS ?=
# Test worker processes (pytest-xdist): 2 uses both cores of a 2-core machine (10 min
# instead of 14 for the suite); TEST_WORKERS=0 runs it in this one process.
TEST_WORKERS ?= 2
RUNGS ?= 1000,4000,16000
SCALE_DIR ?= runs/scale
SCALE_ARGS ?=

.PHONY: demo test bench bench-scale venv clean

venv: $(STAMP)

$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,ann,bench]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/landmarks-demo --run_dir $(RUN_DIR)

test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

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

# The scale ladder (bench/bench_scale.py): real jobs at growing N; results in $(SCALE_DIR).
bench-scale: $(STAMP)
	$(PY) bench/bench_scale.py --rungs $(RUNGS) --output_dir $(SCALE_DIR) $(SCALE_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache

.PHONY: bench-many-classes
# The trainer at 1k, 20k and 203,094 classes for the sigmoid and sub-center ArcFace heads:
# parameters, checkpoint sizes, peak memory, step time, all-reduce bytes (runs/scale/many_classes.*).
# Needs ~16 GB free for the 203k rungs (sigmoid peaked at 15.2 GB); CLASSES=1000,20000 is small.
CLASSES ?= 1000,20000,203094
bench-many-classes: $(STAMP)
	$(PY) bench/bench_many_classes.py --classes $(CLASSES) --output_dir runs/scale
