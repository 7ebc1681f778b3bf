"""The Ray backend: connecting to a cluster, the worker and server actors, and the backend that runs them."""
