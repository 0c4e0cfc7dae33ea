"""xlators features package."""
