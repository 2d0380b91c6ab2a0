"""Results by reference, on the caller's and the service's side.

What a worker writes is contract (:mod:`tpm_fed.protocol.references`, the
reference; :mod:`tpm_fed.storage.result_stores`, a store spec as a
ProxyStore connector; :mod:`tpm_fed.storage.reference_chunks`, chunks
written and read back with their digest checked). Here:

- :mod:`tpm_fed.references.reader`: what a caller's result uses to resolve a
  reference: the store directly when it can reach it, else the service.
- :mod:`tpm_fed.references.records`: the service's record of every reference
  (whose it is, until when), and evicting expired ones.
"""
