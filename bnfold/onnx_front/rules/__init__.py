"""The ONNX front's adapters to the fold rules, one pattern family per module.

Each has the same contract, after onnxscript's rewrite rules: given one node, it
returns a plan (the checked rewrite, computed but not applied), a
:class:`~bnfold.report.Refusal` with a :class:`~bnfold.report.Code` when a
precondition fails, or None when the node is not its pattern. An adapter finds
the nodes, reads them into the specs of :mod:`bnfold.rules` (which decides, the
same for every front), and plans the edit. Planning never modifies the graph;
:mod:`bnfold.onnx_front.passes` applies plans.

- :mod:`.base`       shared: the linear op, the plan, refusals, the BN's affine
- :mod:`.after`      ``affine(linear(x))``, also through a shape-only op
- :mod:`.before`     ``linear(BN(x))``, also through Flatten/Reshape
- :mod:`.shape_ops`  which shape-only ops keep channels whole
- :mod:`.batch_merge`  a reshape merging the batch axis, channels last (LeViT)
- :mod:`.pooling`    a BN after a pool that commutes with it
- :mod:`.add_concat` a BN after an Add or a channel Concat of linear ops
- :mod:`.branch_sum` RepVGG/MobileOne branch sums merged into one Conv

A plan is a :class:`~.base.FoldPlan` (one linear op, applied by the pass) or a
:class:`~.base.Rewrite` (several nodes, applies itself), its site a
:class:`~bnfold.sites.Site`; every rule reuses the one fold math of
:mod:`bnfold.core`. Ranks and dtypes come from :mod:`bnfold.onnx_front.shapes`.
"""
