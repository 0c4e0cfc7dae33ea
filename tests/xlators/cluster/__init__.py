"""Tests of the cluster translators."""
