# The book's two commands: `make book` renders the site, `make test` checks everything CI checks.
# Both set up .venv and fetch the embedded model on first use; no GPU and no Hugging Face hub needed.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
NOTEBOOKS := $(sort $(wildcard book/notebooks/*/*.py))
export PYTHONPATH := $(CURDIR)/book
export MPLBACKEND := Agg
export PYDEVD_DISABLE_FILE_VALIDATION := 1

.PHONY: setup model test unit notebooks site site-check book execute lab clean

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

setup: $(VENV)/.installed

model: setup
	$(PY) -m minqwen fetch embedded

## test: unit tests, every notebook re-executed against its committed outputs, the site built and checked
test: unit notebooks site site-check

unit: model
	$(PY) -m pytest tests --ignore=tests/site

notebooks: model
	$(PY) -m pytest --nbval --nbval-current-env --nbval-sanitize-with book/nbval_sanitize.cfg -p no:cacheprovider book/notebooks

site: setup
	rm -rf book/_build
	$(PY) -m jupyter_book build book --warningiserror --nitpicky --keep-going

site-check: site
	$(PY) -m pytest tests/site

## book: execute every notebook in place (refreshing the committed outputs), then render the site
book: execute site

execute: model
	@for nb in $(NOTEBOOKS); do \
		echo "executing $$nb"; \
		$(VENV)/bin/jupytext --to ipynb --update --execute $$nb || exit 1; \
	done

lab: model
	$(VENV)/bin/jupyter lab book/notebooks

clean:
	rm -rf book/_build .pytest_cache
