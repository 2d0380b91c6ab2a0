"""Batches in OpenAI's batch format: a JSONL file of requests, run by the service, durably and once.

- :mod:`~tpm_fed.batches.protocol`: the shapes the batch API speaks (files, batches, lines, quotes).
- :mod:`~tpm_fed.batches.jsonl`: reading an uploaded file into lines, every bad line reported.
- :mod:`~tpm_fed.batches.lines`: what a line means to the service (its route's body, request and answer).
- :mod:`~tpm_fed.batches.tables`, :mod:`~tpm_fed.batches.store`: files, batches and lines in the ledger's database.
  The store is in parts: :mod:`~tpm_fed.batches.uploads` (files), :mod:`~tpm_fed.batches.batch_records`
  (batches), :mod:`~tpm_fed.batches.outputs` (output and error files), :mod:`~tpm_fed.batches.line_queue`
  (the runner's lines), :mod:`~tpm_fed.batches.rows` (paging).
- :mod:`~tpm_fed.batches.quoting`: a batch's quote (the sum of its lines') and the balance check.
- :mod:`~tpm_fed.batches.runner`: the service's thread that feeds lines to the runtime and records each once.
- :mod:`~tpm_fed.batches.batch_ends`: callers waiting for a batch to end (the long poll), woken by the runner.

Nothing here imports torch or vLLM.
"""
