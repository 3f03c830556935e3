"""The math core: numpy and ints, no graph types, no report codes.

- :mod:`.affine`    the per-channel affine and the fold after or before a linear op
- :mod:`.cast`      the one cast of a folded weight to the model's dtype
- :mod:`.reparam`   a sum of convs reading one input, as one conv
- :mod:`.layouts`   where output and input channels sit in each op's weight
- :mod:`.geometry`  conv geometry a branch merge needs (kernels, pads, strides)

Every front reduces a match to these; the decisions about *whether* a site may
fold live one layer up, in :mod:`bnfold.rules`.
"""
