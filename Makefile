# The book's two commands: `make book` renders the site, `make test` checks everything CI checks.
# Both set up .venv and fetch the embedded model on first use; no GPU and no Hugging Face hub needed.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
NOTEBOOKS := $(sort $(wildcard book/notebooks/*/*.py))
export PYTHONPATH := $(CURDIR)/book
export PYDEVD_DISABLE_FILE_VALIDATION := 1
# The model and device every notebook uses (see README): `make book` and `make lab` fetch this source first.
MINQWEN_MODEL ?= embedded
export MINQWEN_MODEL
# The site check drives this browser; the site reads MathJax from this pinned npm tarball, never from a CDN.
CHROMIUM ?= /usr/bin/chromium
export MINQWEN_CHROMIUM := $(CHROMIUM)
MATHJAX_VERSION := 3.2.2
MATHJAX_SHA256 := 1b9c0a1c44df864e915690558e72adb9cc5203360daefd385084ced3b6c64c09
MATHJAX := book/_vendor/mathjax/tex-chtml.js
LAB_SETTINGS := $(VENV)/share/jupyter/lab/settings/overrides.json
LAB_ARGS ?=

LLAMACPP_VERSION := 0.3.36

.PHONY: setup model test lint unit notebooks site site-check browser book execute lab clean llamacpp

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

setup: $(VENV)/.installed

model: setup
	$(PY) -m minqwen fetch $(MINQWEN_MODEL)

## llamacpp: llama.cpp's Python bindings, built from source (about 10 minutes on 2 cores), for the benchmark's
## `llamacpp` implementation and chapter 6's comparison; not part of `make test`
llamacpp: setup
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install --quiet llama-cpp-python==$(LLAMACPP_VERSION)

## test: lint, unit tests, every notebook re-executed against its committed outputs, the site built and checked
test: lint unit notebooks site site-check

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

unit: model
	$(PY) -m pytest tests --ignore=tests/site

notebooks: model
	$(PY) -m pytest --nbval --nbval-current-env --nbval-sanitize-with book/nbval_sanitize.cfg -p no:cacheprovider book/notebooks

site: setup $(MATHJAX)
	rm -rf book/_build
	$(VENV)/bin/jupyter-book build book --warningiserror --nitpick --keep-going

site-check: site browser
	$(PY) -m pytest --confcutdir=tests/site tests/site

$(MATHJAX):
	@command -v npm >/dev/null || { echo "make: the site needs npm to fetch MathJax (Debian: apt-get install npm)"; exit 1; }
	rm -rf book/_vendor/.mathjax && mkdir -p book/_vendor/.mathjax
	cd book/_vendor/.mathjax && npm pack --silent mathjax@$(MATHJAX_VERSION) >/dev/null
	echo "$(MATHJAX_SHA256)  book/_vendor/.mathjax/mathjax-$(MATHJAX_VERSION).tgz" | sha256sum --check --quiet
	tar -xzf book/_vendor/.mathjax/mathjax-$(MATHJAX_VERSION).tgz -C book/_vendor/.mathjax
	rm -rf book/_vendor/mathjax
	mv book/_vendor/.mathjax/package/es5 book/_vendor/mathjax && rm -rf book/_vendor/.mathjax

browser:
	@test -x "$(CHROMIUM)" || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing Debian's chromium for the site check"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
		fi; \
		test -x "$(CHROMIUM)" || { \
			echo "make: the site check needs Chromium at $(CHROMIUM) (Debian: apt-get install chromium), or CHROMIUM=path"; \
			exit 1; \
		}; \
	}

## book: execute every notebook in place (refreshing the committed outputs), then render the site
book: execute site

execute: model
	$(PY) scripts/execute_notebooks.py $(NOTEBOOKS)

# Double-clicking a .py notebook opens it as a notebook; jupytext keeps the .ipynb beside it paired on save.
$(LAB_SETTINGS): $(VENV)/.installed
	$(VENV)/bin/jupytext-config --settings-file $@ set-default-viewer python

# Containers on GPU boxes often run as root, which Jupyter refuses without --allow-root.
lab: model $(LAB_SETTINGS)
	$(VENV)/bin/jupyter lab --notebook-dir=book/notebooks $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

clean:
	rm -rf book/_build .pytest_cache
