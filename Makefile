# Two commands for a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing and (re)install when pyproject.toml changes.

PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
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

# The main job on the synthetic default: search (quick profile), then the top-5 ensemble.
# A second `make demo` resumes the same experiment instead of starting over.
demo: $(STAMP)
	$(PYTHON) -m covid_ray.tune --experiment $(EXPERIMENT) \
		$(if $(wildcard results/$(EXPERIMENT)/experiment.json),--resume,)
	$(PYTHON) -m ensemble.build --experiment $(EXPERIMENT) --top 5
	@echo
	@echo "Tables (synthetic data): results/$(EXPERIMENT)/leaderboard.md, trials.csv, history.csv,"
	@echo "and results/$(EXPERIMENT)/ensemble/report.md"

test: $(STAMP)
	$(PYTHON) -m pytest

clean-results:
	rm -rf results/$(EXPERIMENT)
