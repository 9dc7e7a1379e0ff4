"""Sample-quality measurement: metrics that can tell a Gaussian fit from the data, a small nonlinear feature
space fitted on real patches, the real-patch data set of the quality benchmark, and plots.

Used by ``benchmarks/bench_quality.py`` (and meant for the evaluation tool)."""
