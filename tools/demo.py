"""Same as ``blsam-demo`` (the code: ``blsam.tools.demo``)."""
import sys

from blsam.tools.demo import cli

if __name__ == "__main__":
    sys.exit(cli())
