"""Models for FLAIR multi-label classification (they know nothing of data or Flower)."""
