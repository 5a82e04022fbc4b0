"""The Flower ServerApp of fedsparse and its strategies (loaded from the app directory, never installed)."""
