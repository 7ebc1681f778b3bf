"""How commands and gradients travel between the parameter server and the workers.

The server's loop (``engine.loop``) and the worker's step (``engine.worker.ShardWorker.execute``) are written once
against the server's end of a transport (``engine.messages.ServerEnd``: publish weights, send a command, receive
the next arrival) and a transport-specific worker loop around ``execute``. The transports:

- ``local``: everything in one process, the serial reference;
- ``shm``: one node; weights, gradients and the control words live in one shared-memory segment, and each
  process polls a sequence counter: no actor task, no pickling, no copy on the step path;
- ``channel``: across nodes; a pair of Ray shared-memory channels per worker (go, answer), read and written by
  the worker's loop and the server's: no actor task per step either;
- ``virtual``: a modelled cluster on a virtual clock, every worker a plain object in this process.

Every transport delivers the same values, so the same config gives bit-equal runs on each.
"""
