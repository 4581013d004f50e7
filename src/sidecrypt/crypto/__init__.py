"""Cryptographic building blocks above the key providers: the key hierarchy (branch keys)."""
