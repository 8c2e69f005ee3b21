"""Discrete-event simulations of the market (SimPy) driving the real coordinator routing code."""
