# From a fresh clone, two commands (README):
#   make explain   creates .venv if missing, installs caap with the pinned versions (constraints.txt) if not
#                  yet done, then runs `caap explain` (the bundled chelsea photo -> ./caap_out)
#   make test      the same with the test extras, then the lint (ruff) and the whole test suite (.ci/run)
# An install is redone only when pyproject.toml or constraints.txt is newer than its stamp file in .venv,
# so a second run installs nothing. Extra arguments: make explain ARGS="photo.jpg --layers 4:7".

PYTHON ?= python3
VENV ?= .venv
LOCK := constraints.txt
ARGS ?=

BIN := $(VENV)/bin
PIP_INSTALL := $(BIN)/python -m pip install -qq --disable-pip-version-check -c $(LOCK)  # -qq: errors only

.DEFAULT_GOAL := explain
.PHONY: explain test lock

# --force: the demo command may be run again (it rewrites ./caap_out, or the --out in ARGS, with the same map)
explain: $(VENV)/.installed
	@$(BIN)/caap explain --force $(ARGS)

# the lint and the tests both run; the exit status is non-zero when either fails
test: $(VENV)/.installed-test
	@echo "ruff check ."; lint=0; $(BIN)/ruff check . || lint=1; \
	$(BIN)/python -m pytest -q $(ARGS) || exit $$?; \
	if [ $$lint != 0 ]; then echo "ruff check . found problems (listed above)"; exit 1; fi

# create the virtual environment if missing, then pip (at its locked version) installs $(1) (named $(2)) with the lock
define install
	@test -x $(BIN)/python || { echo "creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	@echo "installing $(2) into $(VENV) with the versions in $(LOCK) (the first time takes a few minutes)"
	@{ $(PIP_INSTALL) --upgrade pip && $(PIP_INSTALL) -e "$(1)"; } || \
	{ echo "installing into $(VENV) failed: pip's reason is above (the first run needs the package index)"; exit 1; }
endef

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(call install,.,caap)
	@touch $@

$(VENV)/.installed-test: pyproject.toml $(LOCK)
	$(call install,.[test],caap[test])
	@touch $@ $(VENV)/.installed

# rewrite the pins from .venv (after upgrading there and a green `make test`); keeps the header comments
lock: $(VENV)/.installed-test
	@{ grep '^#' $(LOCK); $(BIN)/python -m pip freeze --all --exclude-editable | grep -v -e '^-e ' -e ' @ '; } > $(LOCK).new
	@mv $(LOCK).new $(LOCK)
	@echo "wrote $(LOCK)"
