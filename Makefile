# ftkit: `make demo` and `make test` set up .venv themselves on a fresh machine.
#
# PyTorch is installed first, on its own, so that no dependency pulls a different build.
# The default is the CPU build pinned below. On a GPU machine, choose the CUDA build instead:
#   make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
RECIPE ?= recipes/tiny/qlora_summarize.yaml
# pytest workers (pytest-xdist, one test file per worker at a time): most tests run one single-threaded
# process, so 2 workers keep 2 cores busy
TEST_WORKERS ?= 2

.PHONY: demo test test-fast bench bench-gpu clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e ".[dev]"
	@# no CUDA: DeepSpeed's CPU collectives (a C++ op it compiles at first use, 30-65 s) built now, not inside
	@# the first DeepSpeed test while the other test worker waits for it (if this fails, that run builds it)
	-DS_ACCELERATOR=cpu $(BIN)/python -c "import torch; from deepspeed.comm.torch import build_shm_op; torch.cuda.is_available() or build_shm_op()"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python scripts/qlora_summarize.py --config $(RECIPE) --overwrite_output_dir true

test: $(VENV)/.installed
	$(BIN)/python -m pytest -x -q -rs --durations=15 -n $(TEST_WORKERS) --dist loadfile

test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -x -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/padding_efficiency.py
	$(BIN)/python benchmarks/training_speed.py
	$(BIN)/python benchmarks/memory.py
	$(BIN)/python benchmarks/chunked_loss.py
	$(BIN)/python benchmarks/preflight.py
	$(MAKE) bench-gpu

# GPU only (each says it skipped where there is no CUDA): real-size Phi-2 QLoRA and T5-base steps with
# a profile of one step; the Phi-2 QLoRA recipe against a bare loop and the HF Trainer; then every real
# recipe at its hub model's size with a resume check.
bench-gpu: $(VENV)/.installed
	$(BIN)/python benchmarks/gpu.py
	$(BIN)/python benchmarks/gpu_contenders.py
	$(BIN)/python benchmarks/gpu_smoke.py

clean:
	rm -rf outputs/ .pytest_cache
