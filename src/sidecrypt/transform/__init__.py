"""Pure request and document rules that know nothing of HTTP and do no I/O: path readings,
key folding, form names, the plaintext guard (see design.md)."""
