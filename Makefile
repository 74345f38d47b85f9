# Two commands that work on a fresh machine:
#   make demo   -> create .venv, install, build the bundled demo recipe
#   make test   -> create .venv, install, run the test suite
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
export NO_ALBUMENTATIONS_UPDATE := 1
export HF_HUB_OFFLINE := 1
export PYSPARK_PYTHON := $(abspath $(BIN)/python)

.PHONY: setup browser demo test coverage bench clean

$(BIN)/laionbuild: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip "setuptools<81" wheel
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# retina-face without its declared deps (they would add a second OpenCV and numpy 2); its
	# PyTorch path needs only gdown besides what we have. See laionbuild/models/face_detectors.py.
	$(BIN)/python -m pip install --quiet --no-deps retina-face==0.0.19
	$(BIN)/python -m pip install --quiet "gdown>=4"
	touch $@

setup: $(BIN)/laionbuild

# The browser tests (report, search page) drive Debian's headless Chromium through its
# chromedriver; Playwright's and Selenium's own browser downloads need more than the registries.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  ($(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)

demo: setup
	test -d .dvc || $(BIN)/dvc init --quiet
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/laionbuild build
	@echo "Demo built: data/dataset, data/embeddings, data/index, data/metrics/funnel.json"

# Lint first (ruff, configured in pyproject.toml), then the tests on two workers (pytest-xdist),
# one test file each at a time: the builds are chains of subprocesses that leave a core idle in
# turn; the shared demo is built once for both (tests/shared_demo.py).
test: setup browser
	$(BIN)/ruff check .
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -x -q -n 2 --dist loadfile --durations=25

# The suite under coverage.py (configured in pyproject.toml: stage subprocesses included), then
# line coverage of laionbuild/ (issue #16: the figure must not drop when tests get faster).
coverage: setup browser
	rm -f .coverage .coverage.*
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/coverage run -m pytest -q -n 2 --dist loadfile --durations=25
	$(BIN)/coverage combine -q
	$(BIN)/coverage report --precision=2 | tail -1

bench: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python bench/bench_spine.py

clean:
	rm -rf data
