"""Everything that touches tensors: model execution, KV arenas, attention backends, sampling.

Workers execute the frontend's plans and decide nothing (see DESIGN.md).
"""
