"""FLAIR data: raw format, synthetic generator, HDF5 prepare and reader.

This package knows nothing of Flower or models.
"""
