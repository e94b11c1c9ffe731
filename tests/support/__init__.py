"""Test support: fakes, the daemon rig, data patterns, system helpers, format oracles."""
