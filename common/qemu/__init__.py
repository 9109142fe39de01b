"""QEMU interoperability: its migration stream, read and written."""
