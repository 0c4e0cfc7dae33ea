"""xlators protocol package."""
