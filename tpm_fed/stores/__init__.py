"""Knowledge stores beside the models: documents, chunks, their embeddings from the federation's encoders,
versioned snapshots, and search (dense, BM25, hybrid).

The search core is three modules: :mod:`tpm_fed.stores.index` (dense indexes, exact and HNSW),
:mod:`tpm_fed.stores.lexical` (BM25) and :mod:`tpm_fed.stores.hybrid` (OpenAI's hybrid ranking). Nothing is
imported here, so importing one module of the package does not load the others (or numpy).
"""
