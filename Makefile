# Two commands for a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing and (re)install when pyproject.toml changes.

PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?= data/synthetic
EXPERIMENT ?= demo

.PHONY: demo test install clean-results

$(PYTHON):
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip

# torch==2.14.1 / torchvision==0.29.1 are pinned in pyproject.toml: pip finds them on
# local disk, while an open range would download a multi-GB build.
$(STAMP): pyproject.toml | $(PYTHON)
	$(PYTHON) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m covid_ray.data synth --out $(DATA) --scale 0.05
	$(PYTHON) -m covid_ray.data split --data $(DATA) --out results/$(EXPERIMENT)/split.csv
	@echo
	@echo "Tables: results/$(EXPERIMENT)/split.csv and results/$(EXPERIMENT)/data_report.json (synthetic data)."
	@echo "Next (not built yet): python -m covid_ray.tune, then python -m ensemble.build --top 5."

test: $(STAMP)
	$(PYTHON) -m pytest

clean-results:
	rm -rf results/$(EXPERIMENT)
