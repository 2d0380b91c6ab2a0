"""What runs inside Globus Compute endpoint workers.

The functions registered with Globus Compute live in :mod:`functions.serve`;
they keep model replicas warm in the worker process (:mod:`functions.replica_cache`)
and hand batches to a backend (:mod:`functions.backends`). Heavy imports
(torch, transformers) happen inside the functions, on the worker.
"""
