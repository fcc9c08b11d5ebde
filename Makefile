# cdmtransfer: `make quickstart` sets up and runs the main job; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch. Here pip finds it on local disk; elsewhere point pip at PyTorch's CPU wheel index:
#   make quickstart TORCH_PIP_ARGS="--index-url <PyTorch CPU wheel index>"
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: setup quickstart test fuzz bench paper clean ui

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

quickstart: $(STAMP)
	$(BIN)/cdmtransfer sweep recipes/quickstart.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Property-based fuzzing of every input the tool reads (tests/test_fuzz.py): thousands of fresh random and mutated
# recipes, --set items, data, IDX, condition and checkpoint files, and command lines (make test runs a few hundred).
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -q -m fuzz --hypothesis-show-statistics tests/test_fuzz.py

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_train.py

# The paper's experiments at CPU scale. Conditioned diffusion (theory.md §4.1, recipes/langevin.yaml): one pretrain,
# then frozen (the paper's fine-tuning) / finetune / scratch for m in {10,...,100}, 2 seeds, at the in-domain
# target β0 = 5.5 and the out-of-domain β0 = 15; then the digits-restoration analogue of §4.2 (digits-denoise.yaml).
# Every run trains to convergence by validation. Measured here (OMP_NUM_THREADS=1, 2 quiet cores, both used by the
# sweeps): 5 min 1 s wall on 2026-12-01 (the pretrains stop by validation within a minute; README "make paper").
PAPER_M ?= 10,20,30,40,50,100
PAPER_SEEDS ?= 2
PAPER_ENCODER = $(BIN)/python -c "import json; print(json.load(open('cdmtransfer-runs/paper-pretrain.json'))['run_id'])"
paper: $(STAMP)
	@mkdir -p cdmtransfer-runs
	$(BIN)/cdmtransfer pretrain recipes/langevin.yaml --json > cdmtransfer-runs/paper-pretrain.json
	$(BIN)/cdmtransfer sweep recipes/langevin.yaml --m $(PAPER_M) --seeds $(PAPER_SEEDS) \
		--encoder $$($(PAPER_ENCODER)) --set suite.langevin.beta_target=5.5
	$(BIN)/cdmtransfer sweep recipes/langevin.yaml --m $(PAPER_M) --seeds $(PAPER_SEEDS) \
		--encoder $$($(PAPER_ENCODER)) --set suite.langevin.beta_target=15
	$(BIN)/cdmtransfer sweep recipes/digits-denoise.yaml --m 10,20,50,100 --seeds 3

ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/cdmtransfer-runs/mlflow.db

clean:
	rm -rf cdmtransfer-runs .pytest_cache
