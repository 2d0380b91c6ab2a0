"""Results by reference: the stores a worker writes large results to, and how callers read them back.

- :mod:`tpm_fed.references.connectors`: a store spec (``file:///path``,
  ``redis://host:port``) as a ProxyStore connector.
- :mod:`tpm_fed.references.chunks`: writing a blob as chunks, reading it back
  chunk by chunk with its digest checked.
- :mod:`tpm_fed.references.reader`: what a caller's result uses to resolve a
  reference: the store directly when it can reach it, else the service.
- :mod:`tpm_fed.references.records`: the service's record of every reference
  (whose it is, until when), and evicting expired ones.
"""
