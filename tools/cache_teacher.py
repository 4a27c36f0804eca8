"""Same as ``blsam-cache-teacher`` (the code: ``blsam.tools.cache_teacher``)."""
import sys

from blsam.tools.cache_teacher import cli

if __name__ == "__main__":
    sys.exit(cli())
