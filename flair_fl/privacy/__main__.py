"""`python -m flair_fl.privacy calibrate ...`: privacy budget planning (see calibrate.py)."""

from flair_fl.privacy.calibrate import main

if __name__ == "__main__":
    raise SystemExit(main())
