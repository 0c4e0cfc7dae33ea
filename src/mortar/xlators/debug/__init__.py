"""xlators debug package."""
