"""Model building blocks written for tensor parallelism (identity collectives at one rank)."""
