"""Evaluation: metrics, calibration, plots and the run report."""
