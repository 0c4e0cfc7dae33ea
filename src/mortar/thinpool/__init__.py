"""thinpool package."""
