"""Cryptographic formats and helpers that know no HTTP (see design.md's layout)."""
