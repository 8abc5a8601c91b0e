"""Command-line tooling around the library: sweeps, plots, the memory model, padding counts and reward-benchmark
mixes. Imported only by experiments/ and tests/; training and evaluation (toolrl_jax) never import it."""
