"""Pure request transforms and rules: no HTTP, no I/O (see /docs and design.md)."""
