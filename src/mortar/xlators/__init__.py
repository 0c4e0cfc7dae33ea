"""xlators package."""
