"""shelfsight.runtime."""
