"""Fold BatchNorm in the aten graph of an ``ExportedProgram``'s module.

``ep.module()`` has no ``nn.Conv2d`` objects left, only aten calls reading
``get_attr`` weights, so this front works on graph nodes. Sites are named like
the eager front ("conv1 -> bn1"), from the weights' attribute paths.

Each call of a module is its own node here, so a weight read by several nodes
(a conv module called twice) is cloned for the folded node, which the eager
front cannot do without changing forward().

Modules, in the order a fold runs through them:

- :mod:`.sites`: the sites, :class:`bnfold.sites.Site` records naming aten
  nodes (a branch-sum merge: a ``MergeSite``), and their report entries.
- :mod:`.match`: every BN node to a site or a refusal, asking the families of
  :mod:`bnfold.rules` in their order (:mod:`bnfold.rules.precedence`);
  branch-sum merges come from :mod:`bnfold.torch_front.branch_sum`.
- :mod:`.checks`: whether a matched site's values and shapes fold exactly.
- :mod:`.apply`: new weights and biases for a site, the BN node removed.
- :mod:`.lower`: the BNs left, as plain aten ops (``--lower-standalone``).
- :mod:`.run`: :func:`~bnfold.torch_front.program.run.fold_graph_module`, the
  rounds, verification and rollback, the report.

The node helpers live in :mod:`bnfold.torch_front.aten_graph`, the pools in
:mod:`bnfold.torch_front.pools`.
"""
