"""The step loop and the executors that carry plans to workers."""
