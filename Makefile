# The two commands of the README. Both create/refresh .venv first (scripts/setup.sh).
.PHONY: setup demo test bench

setup:
	bash scripts/setup.sh

# every run is a new sweep: results/quickstart, then quickstart-2, ... (losstune ls lists them)
demo: setup
	.venv/bin/losstune sweep configs/quickstart.yaml

test: setup
	.venv/bin/python -m pytest -q

bench: setup
	.venv/bin/python -m benchmarks.run_all
