"""KV movement between device and host memory: the copier (and, later, the asynchronous swap manager)."""
