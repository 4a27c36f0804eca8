"""Same as ``blsam-estimate-train-memory`` (the code: ``blsam.tools.estimate_train_memory``)."""
import sys

from blsam.tools.estimate_train_memory import cli

if __name__ == "__main__":
    sys.exit(cli())
