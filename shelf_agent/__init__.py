"""shelfsight.shelf_agent."""
