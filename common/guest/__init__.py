"""The emulated memory-tagged guest."""
