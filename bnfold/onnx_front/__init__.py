"""The ONNX front: find fold sites (match, rules/), apply them (passes), load and save (io)."""

import logging

# onnx_ir warns through logging while it reads a damaged model ("Input ... cannot be
# found in any scope"); with no handler configured Python prints that to stderr, in
# front of bnfold's own one-line error. A NullHandler keeps it for applications
# that configure logging and out of the CLI's stderr otherwise.
logging.getLogger("onnx_ir").addHandler(logging.NullHandler())
