"""Same as ``blsam-routing`` (the code: ``blsam.tools.visualize_routing``)."""
import sys

from blsam.tools.visualize_routing import cli

if __name__ == "__main__":
    sys.exit(cli())
