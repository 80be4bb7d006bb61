"""shelfsight.export."""
