# Two entry points for a fresh machine: `make run` and `make test`.
# Both create .venv and install what they need; `make test` also installs the
# Debian packages the integration tests drive (when missing and running as root).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEBIAN_PACKAGES := easy-rsa openssl nginx nftables curl iproute2 chromium systemd linux-libc-dev
STAMP := $(VENV)/.installed

PROMTOOL := build/tools/promtool

.PHONY: run test lint typecheck unit bench clean system-deps

# Debian's python3 makes virtual environments only with python3-venv (ensurepip) installed.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian package python3-venv"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null; \
	  else \
	    echo "python3-venv is missing: run as root (sudo apt-get install python3-venv)"; exit 1; \
	  fi; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

run: $(STAMP)
	$(BIN)/certwarden demo --dir var/demo

system-deps:
	@missing=""; for p in $(DEBIAN_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else \
	    echo "missing Debian packages:$$missing (run as root to install them; tests needing them are skipped)"; \
	  fi; \
	fi

# promtool (tests/test_alerts.py, tests/test_metrics.py) comes out of Debian's prometheus package
# without installing it: installing would also set up, and maybe start, a Prometheus server.
system-deps: $(PROMTOOL)
$(PROMTOOL):
	@tmp=build/prometheus-deb; rm -rf $$tmp && mkdir -p $$tmp $(@D); \
	fetch() { (cd $$tmp && apt-get download -qq prometheus) >$$tmp/apt.log 2>&1; }; \
	if fetch || { [ "$$(id -u)" = 0 ] && apt-get update -qq && fetch; }; then \
	  dpkg-deb --fsys-tarfile $$tmp/prometheus_*.deb | tar -x -C $$tmp ./usr/bin/promtool \
	    && mv $$tmp/usr/bin/promtool $@ \
	    && echo "promtool: extracted from $$(basename $$tmp/prometheus_*.deb) into $@"; \
	  status=$$?; \
	else \
	  echo "missing promtool: cannot download Debian's prometheus package ($$(grep -m1 '^E:' $$tmp/apt.log || echo 'apt-get download failed'); run as root to fetch it; tests needing it are skipped)"; \
	  status=0; \
	fi; \
	rm -rf $$tmp; exit $$status

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy cannot follow setuptools' package-dir mapping (daemon/ -> certwarden),
# so it checks a tree of symlinks laid out the way the package is imported.
typecheck: $(STAMP)
	rm -rf build/typecheck && mkdir -p build/typecheck/certwarden
	ln -s $(CURDIR)/daemon/* build/typecheck/certwarden/
	ln -s $(CURDIR)/plugins build/typecheck/certwarden/plugins
	MYPYPATH=build/typecheck $(BIN)/mypy -p certwarden
	$(BIN)/mypy tests bench

unit: $(STAMP)
	$(BIN)/pytest -q -m 'not slow'

test: system-deps lint typecheck
	$(BIN)/pytest -q

bench: $(STAMP) system-deps
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build var .pytest_cache .mypy_cache .ruff_cache .hypothesis
