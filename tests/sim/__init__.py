"""Deterministic simulation of the request-path core: a simulated clock, PLC and driver."""
