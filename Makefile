# The two commands of the README (`make demo`, `make test`) create .venv/ when it is missing, install, and run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# CPU machines take this wheel; GPU users set e.g. TORCH="torch==2.13.0" with their CUDA index, or TORCH=torch.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY := 1
export DO_NOT_TRACK := 1

.PHONY: demo demo-model test lint format bench bench-gpu bench-loop clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	echo "$(TORCH)" > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m richfeedback demo --out outputs/demo

# Retrain the shipped demo model (rahf/demo_model) from its recipe with the 2 torch threads it was trained with
# (another count gives other bits); DEMO_MODEL_ARGS=--ship replaces it.
demo-model: $(STAMP)
	$(PY) -m richfeedback demo-model --out outputs/demo-model --threads 2 $(DEMO_MODEL_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) benchmarks/score_throughput.py
	$(PY) benchmarks/metrics_speed.py
	$(PY) benchmarks/mask_speed.py
	$(PY) benchmarks/generator_speed.py
	$(PY) benchmarks/lora_speed.py
	$(PY) benchmarks/flow_overhead.py
	$(PY) benchmarks/score_bounds.py
	$(PY) benchmarks/train_memory.py
	$(PY) benchmarks/readout_cost.py

# Every GPU measurement in one run of under 8 minutes (needs CUDA); `--dry-run` checks it on the CPU.
bench-gpu: $(STAMP)
	$(PY) benchmarks/gpu_suite.py $(BENCH_GPU_ARGS)

# The loop-gain benchmark needs matplotlib for its plot: the `bench` extra, installed once.
BENCH_STAMP := $(VENV)/.installed-bench
BENCH_LOOP_ARGS ?=

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e ".[bench]"
	touch $(BENCH_STAMP)

bench-loop: $(BENCH_STAMP)
	$(PY) -m richfeedback bench-loop --out outputs/bench-loop $(BENCH_LOOP_ARGS)

clean:
	rm -rf outputs .pytest_cache
