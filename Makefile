# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA := /usr/share/datasets/fashion-mnist

.PHONY: demo test install data bench clean firmware firmware-toolchain firmware-learn notebooks docs

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,examples,mpi]'
	touch $@

install: $(VENV)/.installed

$(VENV)/.installed-docs: pyproject.toml | $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[test,examples,mpi,docs]'
	touch $@

# The three notebooks of examples/notebooks/, executed top to bottom (a time limit per cell) into
# build/notebooks/ (the stored notebooks keep no outputs); a notebook that fails fails the target.
notebooks: $(VENV)/.installed-docs data
	$(BIN)/python examples/notebooks/run_notebooks.py --out build/notebooks

# The documentation site (Sphinx + MyST-NB: README, docs/, the executed notebooks, the API
# reference from the docstrings) in build/docs/html; any warning is an error. It shows the
# notebooks' executed copies: `make notebooks` runs first unless every copy in build/notebooks/ is
# newer than its notebook and than every .py of bll_ref/ and exporters/ (so CI, which has just run
# `make notebooks`, does not run them twice).
docs: $(VENV)/.installed-docs
	@stale=0; for nb in examples/notebooks/*.ipynb; do out=build/notebooks/$$(basename $$nb); \
	  if [ ! -f $$out ] || [ -n "$$(find $$nb bll_ref exporters -newer $$out \( -name '*.py' -o -name '*.ipynb' \) -print -quit)" ]; \
	  then stale=1; fi; done; \
	if [ $$stale = 1 ]; then $(MAKE) --no-print-directory notebooks; fi
	$(BIN)/python -m sphinx -W --keep-going -q -b html docs build/docs/html

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
	OPENBLAS_NUM_THREADS=1 $(BIN)/python benchmarks/step_time.py

# The C golden model on an emulated Cortex-M4 (docs/firmware.md).  firmware-toolchain installs the
# ARM cross compiler, newlib and QEMU (Debian packages; as root with apt-get) unless present;
# firmware trains a small MLP and CNN briefly, exports them at 8 bits and runs each export's C
# golden model on QEMU's mps2-an386, checking every code against the HDF5 traces (exit 1 if not).
FW := out/firmware
FW_PKGS := gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm
FW_HAVE := command -v arm-none-eabi-gcc >/dev/null && command -v arm-none-eabi-size >/dev/null \
	&& command -v qemu-system-arm >/dev/null \
	&& arm-none-eabi-gcc -mcpu=cortex-m4 -mthumb -print-file-name=librdimon.a | grep -q /

firmware-toolchain:
	@if $(FW_HAVE); then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing $(FW_PKGS)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends $(FW_PKGS) >/dev/null \
	  && { $(FW_HAVE) || { echo "make firmware-toolchain: installed $(FW_PKGS) but the tools are still missing" >&2; exit 1; }; }; \
	else echo "make firmware: needs $(FW_PKGS); run it as root with apt-get, or install them yourself" >&2; exit 2; fi

firmware: install data firmware-toolchain
	$(BIN)/bll-ref train --method bll --sizes 784,128,128,10 --activation relu --epochs 1 \
	  --limit-train 5000 --limit-test 1000 --out $(FW)/mlp
	$(BIN)/bll-ref export $(FW)/mlp/checkpoint.npz --out $(FW)/mlp-w8.h5 --width 8
	$(BIN)/bll-ref firmware $(FW)/mlp-w8.h5 --workdir $(FW)/mlp-fw
	$(BIN)/bll-ref train --method bll --model cnn --epochs 1 --limit-train 512 --limit-test 256 --out $(FW)/cnn
	$(BIN)/bll-ref export $(FW)/cnn/checkpoint.npz --out $(FW)/cnn-w8.h5 --width 8
	$(BIN)/bll-ref firmware $(FW)/cnn-w8.h5 --workdir $(FW)/cnn-fw

# On-device block-local learning (docs/on-device-learning.md): train the MLP on the host, export it at
# 8 bits, then on QEMU's Cortex-M4 blocks 2 and 3 adapt to low-contrast images from 1,000 labelled
# samples with the integer BLL update, every learned code checked against the Python twin after every
# step (exit 1 if not).  The last line is the summary of issue 25.
FWL := out/firmware-learn
firmware-learn: install data firmware-toolchain
	$(BIN)/bll-ref train --method bll --sizes 784,128,128,10 --activation relu --epochs 5 \
	  --limit-train 20000 --limit-test 2000 --out $(FWL)/mlp
	$(BIN)/bll-ref export $(FWL)/mlp/checkpoint.npz --out $(FWL)/mlp-w8.h5 --width 8
	$(BIN)/bll-ref firmware-learn $(FWL)/mlp-w8.h5 --workdir $(FWL)/learn --learn-blocks 2,3 --lr-shift 9,8 \
	  --samples 1000 --test 2000 --shift contrast

clean:
	rm -rf $(VENV) .pytest_cache build
