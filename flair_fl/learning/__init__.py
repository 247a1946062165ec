"""Training math shared by every mode: local training steps, FLAIR metrics, central evaluation."""
