# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA := /usr/share/datasets/fashion-mnist

.PHONY: demo test install data bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,examples,mpi]'
	touch $@

install: $(VENV)/.installed

# Fashion-MNIST from Debian's dataset-fashion-mnist when we can (root + apt); else the synthetic fallback.
data:
	@if [ -n "$$BLL_DATA" ] || [ -f $(DATA)/train-images-idx3-ubyte.gz ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
	  || echo "note: could not install dataset-fashion-mnist; the demo uses the synthetic task"; \
	else echo "note: not root or no apt-get; the demo uses the synthetic task (set BLL_DATA to use Fashion-MNIST)"; fi

demo: install data
	$(BIN)/bll-ref demo

# pytest exit 5 (no tests collected) is a failure, never a silent pass.
test: install data
	@$(BIN)/python -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

bench: install data
	$(BIN)/python benchmarks/step_time.py

clean:
	rm -rf $(VENV) .pytest_cache
