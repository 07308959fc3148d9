# Two commands on a fresh machine: `make demo` (the toy edit, CPU) and `make test`.
# Both create .venv on first use. The CPU build of torch is pinned first so pip never pulls a
# multi-GB CUDA build here; on a GPU machine install your CUDA torch first, then `pip install -e .`.
PY := .venv/bin/python
TORCH ?= torch==2.13.0

.PHONY: demo test bench install clean

$(PY):
	python3 -m venv .venv
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]"

install: $(PY)

demo: $(PY)
	.venv/bin/loraedit demo

test: $(PY)
	$(PY) -m pytest -q

bench: $(PY)
	$(PY) bench/bench_train.py

clean:
	rm -rf .venv runs .pytest_cache
