"""Flower glue: the ClientApp, the ServerApp round loop, cohort sampling, simulation."""
