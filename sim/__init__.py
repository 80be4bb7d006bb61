"""shelfsight.sim."""
