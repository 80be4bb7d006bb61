"""shelfsight.calibration."""
