"""Storage both ends share: files written whole or not at all, content-addressed chunks, the model store
read, result stores opened, results by reference put and read, the adapter registry's files.

Not the contract (:mod:`tpm_fed.protocol` says what crosses the wire and
does no I/O): this is code that reads and writes where the contract's
formats live. The worker may import it (it runs there, so its sources count
in the serving code version); it imports nothing of ``tpm_fed`` but the
contract, and no heavy library at import time.

- :mod:`~tpm_fed.storage.atomic`: whole-or-absent writes (bytes, or chunks one at a time).
- :mod:`~tpm_fed.storage.chunks`: content-addressed chunks (the model store's and the adapters' bytes).
- :mod:`~tpm_fed.storage.store_reader`: reading a model version from the store.
- :mod:`~tpm_fed.storage.result_stores`: a result store's spec, opened as a ProxyStore connector.
- :mod:`~tpm_fed.storage.reference_chunks`: a result's tensors put in a store by chunk, and read back checked.
- :mod:`~tpm_fed.storage.adapter_registry`: registered adapters' files.
"""
