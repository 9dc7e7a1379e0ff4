"""Sample-quality measurement: metrics that can tell a Gaussian fit from the data, a small nonlinear feature
space fitted on real patches, latent statistics, the Inception path and the reference sets.

Used by the evaluation in training, ``launch/evaluate.py`` and ``benchmarks/bench_quality.py`` (whose data sets
and plots live beside it in ``benchmarks/``)."""
