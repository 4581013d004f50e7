"""The HTTP engine's building blocks that need no proxy: TLS key-exchange groups so far."""
