"""The reverse proxy: app, routing, field transforms, upstream forwarding, TLS."""
