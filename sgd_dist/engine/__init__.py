"""The step: a command out to a worker, its answer in, the policy's update applied (no Ray, no I/O)."""
