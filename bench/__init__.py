"""Benchmarks: `python -m bench.train_bench`, `python -m bench.eval_bench`; results as JSON in bench/."""
