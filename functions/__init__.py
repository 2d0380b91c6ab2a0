"""What runs inside Globus Compute endpoint workers.

The functions registered with Globus Compute live in :mod:`functions.serve`;
they keep model replicas warm in the worker process (:mod:`functions.replica_cache`),
hand each kind of request to its handler (:mod:`functions.handlers`) on a
backend with the capability it needs (:mod:`functions.backends`), and take
what they permit from the endpoint's own configuration, never from a task
(:mod:`functions.policy`). From ``tpm_fed`` they import only the contract,
``tpm_fed.protocol``. Heavy imports (torch, transformers) happen inside the
functions, on the worker.
"""
