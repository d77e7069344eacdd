"""Benchmarks run by `./dev bench NAME`; each writes .bench/NAME.json."""
