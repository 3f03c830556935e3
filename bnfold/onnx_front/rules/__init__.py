"""The fold rules of the ONNX front, one pattern family per module.

Each rule has the same contract, after onnxscript's rewrite rules: given one
node, it returns a plan (the checked rewrite, computed but not applied), a
:class:`~bnfold.report.Refusal` with a :class:`~bnfold.report.Code` when a
precondition fails, or None when the node is not its pattern. Planning never
modifies the graph; :mod:`bnfold.onnx_front.passes` applies plans.

- :mod:`.base`       shared: the linear op, the plan, refusals, the BN's affine
- :mod:`.after`      ``affine(linear(x))``, also through a shape-only op
- :mod:`.before`     ``linear(BN(x))``, also through Flatten/Reshape
- :mod:`.shape_ops`  which shape-only ops keep channels whole
"""
