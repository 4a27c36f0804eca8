"""Same as ``blsam-export-onnx`` (the code: ``blsam.tools.export_onnx``)."""
import sys

from blsam.tools.export_onnx import cli

if __name__ == "__main__":
    sys.exit(cli())
