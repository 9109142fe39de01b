"""Shared parts of the MTE live-migration pipeline: the emulated guest, the wire, logging."""
