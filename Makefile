# Two commands on a fresh machine: `make demo` (the toy edit, CPU) and `make test`.
# Both create .venv on first use. The CPU build of torch is pinned first so pip never pulls a
# multi-GB CUDA build here; on a GPU machine install your CUDA torch first, then `pip install -e .`.
PY := .venv/bin/python
TORCH ?= torch==2.13.0

.PHONY: demo test bench install browser clean

$(PY):
	python3 -m venv .venv
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"

# the package and its test extras, again whenever pyproject.toml changes (a new dependency)
.venv/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]"
	touch $@

install: .venv/.installed

# the browser test drives Debian's Chromium through its chromedriver; as root it is installed when missing
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "no chromium/chromedriver and no root apt-get: the browser test will be skipped"; fi; fi

demo: .venv/.installed
	.venv/bin/loraedit demo

# two pytest-xdist workers: most tests keep about one core busy, so on 2 cores the suite takes 6.6 min instead of 10
# (2026-11-26's CPU; 8.3 min instead of 17 on 2026-11-27's slower one)
test: .venv/.installed browser
	$(PY) -m pytest -q -n 2

bench: .venv/.installed
	$(PY) bench/bench_train.py

clean:
	rm -rf .venv runs .pytest_cache
