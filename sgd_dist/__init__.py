"""sgd_dist: distributed mini-batch SGD with a parameter server on Ray and PyTorch."""

__version__ = "0.1.0"
