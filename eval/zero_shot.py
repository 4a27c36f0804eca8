"""Same as ``blsam-eval`` (the code: ``blsam.tools.zero_shot``)."""
import sys

from blsam.tools.zero_shot import cli

if __name__ == "__main__":
    sys.exit(cli())
