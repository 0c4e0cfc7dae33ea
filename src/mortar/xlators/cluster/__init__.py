"""xlators cluster package."""
