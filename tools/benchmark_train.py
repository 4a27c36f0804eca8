"""Same as ``blsam-benchmark-train`` (the code: ``blsam.tools.benchmark_train``)."""
import sys

from blsam.tools.benchmark_train import cli

if __name__ == "__main__":
    sys.exit(cli())
