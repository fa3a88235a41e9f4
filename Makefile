# Two set-up commands for a fresh machine: `make run` (generate with the embedded default
# model) and `make test` (the CPU test suite). Both create .venv and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
DEFAULT_MODEL ?= models/xlstm-shakespeare-10m
PROMPT ?= ROMEO.
STAMP := $(VENV)/.installed

.PHONY: run test lint install clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	@if [ -f "$(DEFAULT_MODEL)/config.json" ]; then \
		$(VENV)/bin/fastxlstm generate --model $(DEFAULT_MODEL) --prompt "$(PROMPT)" --max-new-tokens 120 \
			--temperature 0.8 --top-p 0.95 --seed 0; \
	else \
		echo "NOTE: no trained default model in $(DEFAULT_MODEL) yet; generating with a small RANDOMLY"; \
		echo "      initialised model built by this command (xlstm-tiny): its output is noise."; \
		$(VENV)/bin/fastxlstm generate --model random:xlstm-tiny --prompt "$(PROMPT)" --max-new-tokens 40; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) lint
	$(VENV)/bin/pytest -q -m "not gpu" --durations=15

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
