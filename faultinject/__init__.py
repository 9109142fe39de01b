"""Fault injection for the migration link: a ZMTP-aware TCP proxy and network namespaces."""
