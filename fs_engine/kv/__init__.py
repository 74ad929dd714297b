"""KV memory bookkeeping on the frontend: which blocks each request holds (no tensors here)."""
