# Two commands on a fresh machine:  `make demo`  then  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
SKYLOC := $(VENV)/bin/skyloc
DEMO := demo_out

.PHONY: venv demo test lint bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

demo: venv
	$(PY) scripts/demo.py --out $(DEMO)

test: venv
	$(PY) -m pytest -q -ra

lint: venv
	$(VENV)/bin/ruff check engine tests bench scripts
	$(VENV)/bin/ruff format --check engine tests bench scripts

clean:
	rm -rf $(DEMO) bench_out .pytest_cache
