"""Evaluation: metrics with bootstrap CIs, predictions, paired differences, the probe."""
