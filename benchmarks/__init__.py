"""losstune benchmarks (not part of the test run): ``python -m benchmarks.run_all`` or ``python -m benchmarks.<name>``.

Each benchmark prints a table and writes ``results/bench/<name>.json`` (machine info, timestamp, git
revision, settings, numbers, goals). ``--quick`` runs a short version (smoke-sized; its numbers are
not meaningful for the goals). Timings on a shared machine are noisy: every benchmark measures the
things it compares side by side in one run and reports ratios.
"""
