"""Examples of using fedsparse's pieces from your own Flower apps."""
