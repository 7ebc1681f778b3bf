"""Studies over many runs: sweeps, their results.csv, the cost model and the figures."""
