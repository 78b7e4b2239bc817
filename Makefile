# Two commands for a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing and (re)install when pyproject.toml changes.

PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXPERIMENT ?= demo

.PHONY: demo test install browser screenshot clean-results

$(PYTHON):
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip

# torch==2.14.1 / torchvision==0.29.1 are pinned in pyproject.toml: pip finds them on
# local disk, while an open range would download a multi-GB build.
$(STAMP): pyproject.toml | $(PYTHON)
	$(PYTHON) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(STAMP)

# The browser tests (tests/test_web.py) drive Debian's chromium through Playwright. It is
# installed from Debian's packages when missing (as root, or with passwordless sudo); never
# with `playwright install`, which downloads a browser build. `make demo` does not need it.
# Exported: tests/test_web.py launches the same binary.
export COVID_RAY_CHROMIUM ?= /usr/bin/chromium

browser:
	@if [ -x "$(COVID_RAY_CHROMIUM)" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo"; \
	else echo "make: $(COVID_RAY_CHROMIUM) is missing and installing it needs root; run" \
		"'sudo apt-get install -y chromium' (tests/test_web.py fails without it)" >&2; exit 0; fi; \
	echo "installing Debian's chromium for the browser tests (tests/test_web.py)"; \
	{ $$sudo apt-get update -qq && \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	echo "make: installing chromium failed (see above); tests/test_web.py fails without it" >&2

# The main job on the synthetic default: search (quick profile), then the top-5 ensemble.
# A second `make demo` resumes the same experiment instead of starting over.
demo: $(STAMP)
	$(PYTHON) -m covid_ray.tune --experiment $(EXPERIMENT) \
		$(if $(wildcard results/$(EXPERIMENT)/experiment.json),--resume,)
	$(PYTHON) -m ensemble.build --experiment $(EXPERIMENT) --top 5
	@echo
	@echo "Tables (synthetic data): results/$(EXPERIMENT)/leaderboard.md, trials.csv, history.csv,"
	@echo "and results/$(EXPERIMENT)/ensemble/report.md"

test: $(STAMP) browser
	$(PYTHON) -m pytest

# docs/web-page.png, the README's picture of the service's page (see benchmarks/web_screenshot.py).
screenshot: $(STAMP) browser
	$(PYTHON) -m benchmarks.web_screenshot

clean-results:
	rm -rf results/$(EXPERIMENT)
