"""Run modes: the federated run (Flower simulation) and the centralized baseline, and what
builds them from the config."""
