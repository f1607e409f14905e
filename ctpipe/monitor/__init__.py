"""Drift monitoring: what predict and serve see, against what the model was trained on.

``record`` (one PHI-free record per series: acquisition, intensities, outputs), ``drift`` (the
tests: Kolmogorov-Smirnov, Wasserstein and PSI for numbers, chi-squared and Jensen-Shannon for
categories), ``report`` (Markdown + JSON + a plot per drifting feature). Entry point:
``python -m ctpipe.monitor REFERENCE RECORDS``.
"""
