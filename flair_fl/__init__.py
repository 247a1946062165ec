"""flair-fl: federated-learning research on Apple's FLAIR dataset, on Flower."""

__version__ = "0.1.0"
