# `make demo` and `make test` set up .venv on first use: torch first, pinned, then the project.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo demo-check test test-gpu-stack bench-gpu clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

# the class-conditional demo: train (resumes a finished run), then a grid with one row per digit and a morph strip
DEMO_CKPT := runs/demo-conditional/checkpoints/step_00002000.pt

demo: $(BIN)/.installed
	$(BIN)/fastglow train --conditional --data digits --out runs/demo-conditional --resume \
		--n-flow 16 --n-block 2 --hidden 16 --affine --batch 64 --lr 2e-3 --warmup 100 --cooldown 1000 \
		--steps 2000 --seed 0 --eval-every 500 --ckpt-every 500 --zoom 4 --no-reversible --threads 1
	$(BIN)/fastglow sample --ckpt $(DEMO_CKPT) --class all --n 10 --zoom 4 --out runs/demo-conditional/classes.png
	$(BIN)/fastglow morph --ckpt $(DEMO_CKPT) --from 3 --to 8 --zoom 4 --out runs/demo-conditional/morph_3_to_8.png

# the demo's measurements (benchmarks/RESULTS.md): its unconditional twin, sample recognition, accuracy
demo-check: demo
	$(BIN)/python -m benchmarks.studies.conditional_demo_check --run runs/demo-conditional --twin runs/demo-unconditional

# one pytest worker per core (pytest-xdist), each with one torch thread (tests/conftest.py)
TEST_WORKERS ?= auto
test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

# The GPU machine's Triton (and the numpy its interpreter needs), pinned in benchmarks/gpu_run/gpu_stack.txt, beside the
# same CPU torch: the kernel tests and every op's opcheck (the level ops through the Triton backend included) under
# its interpreter, and the sm_90 gate compiled by its compiler.
GPU_STACK_VENV ?= .venv-gpustack
GPU_STACK_BIN := $(GPU_STACK_VENV)/bin
GPU_STACK_TESTS := tests/test_kernels_flow_step.py tests/test_kernels_lu_squeeze.py tests/test_kernel_ops.py \
	benchmarks/compile_gate/test_compile_gate.py benchmarks/compile_gate/test_launch_capture.py

$(GPU_STACK_BIN)/.installed: pyproject.toml benchmarks/gpu_run/gpu_stack.txt
	test -x $(GPU_STACK_BIN)/python || $(PYTHON) -m venv $(GPU_STACK_VENV)
	$(GPU_STACK_BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(GPU_STACK_BIN)/python -m pip install --quiet -e ".[test]" -r benchmarks/gpu_run/gpu_stack.txt
	touch $@

test-gpu-stack: $(GPU_STACK_BIN)/.installed
	$(GPU_STACK_BIN)/python -c "import triton, numpy; print('GPU stack: triton', triton.__version__, 'numpy', numpy.__version__)"
	$(GPU_STACK_BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal -W "ignore:Conversion of an array with ndim:DeprecationWarning" $(GPU_STACK_TESTS)

# Every GPU target in one command (benchmarks/gpu_run/): installs nothing, runs with the Python that has torch;
# results under $(OUT). Without CUDA: the CPU smoke run at tiny shapes. ROSINALITY=DIR adds rosinality's model.py.
OUT ?= gpu-run
BUDGET ?= 360
bench-gpu:
	PYTHONUNBUFFERED=1 $(PYTHON) -m benchmarks.gpu_run --out $(OUT) --budget $(BUDGET)$(if $(ROSINALITY), --rosinality $(ROSINALITY))

clean:
	rm -rf $(VENV) $(GPU_STACK_VENV) build *.egg-info .pytest_cache
