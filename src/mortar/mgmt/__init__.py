"""mgmt package."""
