"""The Flower ClientApp of fedsparse (loaded from the app directory, never installed)."""
