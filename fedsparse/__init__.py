"""fedsparse: sparse federated learning (SSFL and baselines) on Flower, with exact byte accounting."""

__version__ = "0.1.0"
