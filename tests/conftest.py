import os
import sys

# Tests import the packages from this checkout whether or not it is pip-installed.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Keep the sample corpus cache of the test session out of the user's cache directory.
os.environ.setdefault("SUBTRACK_CACHE", os.path.join(ROOT, ".cache"))
