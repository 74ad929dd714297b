"""Simulated devices: the engine's production scheduler in virtual time against a GPU's cost model.

``devices`` (every constant, with its source), ``cost_model`` (step and copy times), ``executor`` (the
``device="sim:<gpu>"`` executor), ``clock`` (wall and virtual clocks), ``calibrate`` (fit a profile to the
device at hand).
"""
