# `make run`: set up and run the demo on the default model; `make test`: set up and run the tests.
STAMP := .venv/.installed

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

.PHONY: run test bench
run: $(STAMP)
	.venv/bin/kvtrove demo

test: $(STAMP)
	.venv/bin/python -m pytest -q

bench: $(STAMP)
	bash scripts/setup.sh bench
	.venv/bin/python -m bench.core
