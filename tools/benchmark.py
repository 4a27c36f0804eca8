"""Same as ``blsam-benchmark`` (the code: ``blsam.tools.benchmark``)."""
import sys

from blsam.tools.benchmark import cli

if __name__ == "__main__":
    sys.exit(cli())
