"""Request and document transforms that know nothing of HTTP: key folding, guards."""
