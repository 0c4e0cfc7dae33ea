"""xlators performance package."""
