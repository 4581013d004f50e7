"""Tokens that fit a legacy app: format-preserving tokens, a keyed blind index, the vault.

``formats`` (pure: shapes and value spaces), ``stream`` and ``index`` (where a token's
characters come from), ``table`` (the protocol a store implements for the vault), ``vault``
(tokenize / detokenize with the cache).
"""
