"""Same as ``blsam-train`` (the code: ``blsam.tools.train``)."""
import sys

from blsam.tools.train import cli

if __name__ == "__main__":
    sys.exit(cli())
