"""Tests that drive real clients nobody here wrote (QEMU, libnbd, fio) against mortar volumes."""
