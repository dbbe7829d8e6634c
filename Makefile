# The two README commands: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch and torchvision are installed first and pinned: pip takes these two from the machine's disk,
# where an unpinned `torch` would download several GB (timm needs torchvision).
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/python -c "import iared, torch; assert torch.__version__.startswith('2.14.1')"
	# The C++ block (iared.backbones.native), built once now rather than on first use (about a minute).
	$(BIN)/python -c "from iared.backbones.native import native_module; native_module()"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/iared demo

test: install
	$(BIN)/python -m pytest -q -m "not requires_cuda"

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
