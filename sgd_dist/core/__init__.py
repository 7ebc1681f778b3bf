"""Pure math for sgd_dist (compression, the outer optimizer): no Ray, no I/O.
Each function here is a plain tensor computation, checked alone against a plain-PyTorch reference."""
