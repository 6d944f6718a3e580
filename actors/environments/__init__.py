"""Multi-turn environments (reset/step), the built-ins, and the token-in-token-out episode record."""
