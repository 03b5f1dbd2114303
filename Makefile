# `make demo` and `make test` set up .venv on first use: torch first, pinned, then the project.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/fastglow train --data digits --out runs/demo --resume \
		--n-flow 16 --n-block 2 --hidden 16 --affine --batch 64 --lr 2e-3 --warmup 100 --cooldown 1000 \
		--steps 2000 --seed 0 --eval-every 500 --ckpt-every 500 --zoom 4 --no-reversible --threads 1

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
