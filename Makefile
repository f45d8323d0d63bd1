# Two commands for a newcomer (see README.md):
#   make demo   set up .venv, run the quickstart notebook on the offline default, print the results
#   make test   set up .venv, run the whole test suite (unit tests + notebooks through nbval)
#   make bench-gpu  every GPU figure in one run (bench/gpu.py)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

# Offline by default: nothing in the demo or the tests may reach the Hub.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: demo test install bench bench-gpu clean pretrain

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,lab]'
	@# notebooks are committed without outputs: strip them on `git add` (a no-op outside a git checkout)
	-$(BIN)/nbstripout --install 2>/dev/null
	touch $(STAMP)

demo: $(STAMP)
	mkdir -p outputs
	$(BIN)/papermill notebooks/00_quickstart.ipynb outputs/00_quickstart.ipynb --cwd notebooks --progress-bar
	$(BIN)/workbench summarize outputs/quickstart/results.csv

test: $(STAMP)
	@# two workers (pytest-xdist); --dist loadfile keeps each notebook's cells, and each test file's
	@# module fixtures, in one worker. One torch thread per worker: the test models' matrices are
	@# tiny, and two workers each spinning two OpenMP threads on two cores made a small matmul ~15x
	@# slower than one thread (measured: 15.7 ms vs 1.1 ms for 2304x64 @ 64x256 on a loaded machine)
	TQDM_DISABLE=1 OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest tests notebooks -n 2 --dist loadfile \
		--nbval-lax --nbval-current-env --nbval-cell-timeout=600 \
		--nbval-sanitize-with tests/nbval_sanitize.cfg -p no:randomly --durations=25

# pretrain the offline model workbench-tiny-scenes on the scene corpus (CPU, one thread, ~23 min; resumable:
# rerun to continue from the last finished epoch); writes workbench/assets/workbench-tiny-scenes/
pretrain: $(STAMP)
	$(BIN)/python -m workbench.pretrain

bench: $(STAMP)
	$(BIN)/python bench/features.py
	$(BIN)/python bench/training_free.py
	$(BIN)/python bench/fine_tuning.py
	$(BIN)/python bench/sweep.py
	$(BIN)/python bench/pairs.py

# every GPU figure the README and the benchmarks promise, in one run (<= 8 min on one GPU; on a CPU it
# runs the offline model at tiny sizes and says so). DEVICE=cuda:1 picks another GPU.
DEVICE ?= auto
bench-gpu: $(STAMP)
	$(BIN)/python bench/gpu.py --device $(DEVICE)

clean:
	rm -rf outputs .pytest_cache
