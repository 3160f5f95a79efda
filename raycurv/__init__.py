"""raycurv: find what a neural network memorizes, by the input-loss curvature of every sample."""

__version__ = "0.1.0"
