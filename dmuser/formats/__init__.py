"""Kernel on-disk formats: pure encode/decode."""
