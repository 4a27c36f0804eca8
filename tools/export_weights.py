"""Same as ``blsam-export-weights`` (the code: ``blsam.tools.export_weights``)."""
import sys

from blsam.tools.export_weights import cli

if __name__ == "__main__":
    sys.exit(cli())
