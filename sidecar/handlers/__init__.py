"""One small module per API surface; ``routes()`` lists them all for the app factory."""
