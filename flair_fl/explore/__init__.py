"""Dataset exploration: `python -m flair_fl.explore <raw dir or HDF5>`.

The statistics and pictures of ml-flair's exploration notebooks, as one command that reads a
raw FLAIR directory or a prepared HDF5 (any layout) streaming, one user at a time.
"""

from flair_fl.explore.pipeline import ExploreResult, explore

__all__ = ["ExploreResult", "explore"]
