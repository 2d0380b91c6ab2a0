"""Replicas split over several ranks ("nodes"): the model's decoder layers in pipeline stages.

Rank 0 is the endpoint worker that holds the replica and serves requests: it
keeps the token embeddings, its share of the layers, the final norm and the
unembedding, and runs transformers' own ``generate``. Each later rank holds one
contiguous run of layers and loops on messages: hidden states in, hidden
states out (its own KV cache kept between steps), trace steps on its points.
The ranks talk through ``torch.distributed`` point-to-point calls (gloo on CPU);
how they are started is the launcher's business (:mod:`functions.multinode.launcher`).
"""
