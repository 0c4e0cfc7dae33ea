"""mortar: a storage stack for KVM (distributed file system, native access, thin pools, management)."""

__version__ = "0.1.0"
