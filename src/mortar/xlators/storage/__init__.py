"""xlators storage package."""
