"""The service: ``tpm serve``, the one trusted party of a federation.

It owns the federation runtime (broker, ledger, replica registry, replica
dispatchers, sites) and speaks HTTP: OpenAI-compatible routes under ``/v1``
and tpm-fed's own under ``/tpm/v1``. Callers (the ``tpm`` CLI, ``Client``,
``Executor``, Parsl apps, the ``openai`` library, a browser) hold no broker
and no ledger; they send a bearer token, and the service decides.

Files: ``runtime`` (the federation runtime), ``assembly`` (the composition
root: builds the runtime, the back channel, the serving objects, the batch
runner and the stores, and takes them down in reverse), ``app`` (routes, identity,
errors), ``routes_openai``/``routes_native``, one ``serving_*`` class per
OpenAI request kind, ``api_models`` (the bodies), ``auth`` (local token or
Globus Auth), ``limits`` (body size and pace), ``server`` (the process).
Nothing here is imported by the user side at import time.
"""
