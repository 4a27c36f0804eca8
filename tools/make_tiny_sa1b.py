"""Same as ``blsam-make-tiny-sa1b`` (the code: ``blsam.tools.make_tiny_sa1b``)."""
import sys

from blsam.tools.make_tiny_sa1b import cli

if __name__ == "__main__":
    sys.exit(cli())
