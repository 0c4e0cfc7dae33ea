"""Tests of the frontends (NBD, FUSE)."""
