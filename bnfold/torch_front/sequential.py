"""The third finder: a linear module and a BN that are neighbours in a plain
``nn.Sequential``, for modules neither tracer can follow (data-dependent control
flow in forward()).

It sees only ``linear, BN``, ``BN, linear`` and either with an ``nn.Flatten`` or
``nn.Unflatten`` between; no pools, joins or taps.
"""

from __future__ import annotations

from torch import nn

from bnfold.report import Code, Refusal
from bnfold.sites import site_label
from bnfold.torch_front.eager_match import bn_call_refusal, prefer_before, reused_detail
from bnfold.torch_front.eager_pairs import Pair, Scan
from bnfold.torch_front.modules import BN, LINEAR, Calls, Roles
from bnfold.torch_front.site_graph import is_nonlinear

_FINDER = "sequential"


def match_sequential(root: nn.Module, roles: Roles, calls: Calls) -> Scan:
    """Pairs from adjacency inside plain ``nn.Sequential`` containers.

    A pair needs the linear module and the BN to have run exactly as often as the
    Sequential: then every call of each was the Sequential's, and the only way
    the linear output reached anything is the Sequential feeding it to the BN.
    """
    scan = Scan(_FINDER)
    seen: set[str] = set()
    for path, m in root.named_modules():
        if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward:
            for bn, result in _match_in_sequential(path, m, roles, calls):
                seen.add(bn)  # not from the label: a before site's ends in the linear module
                scan.add(result)
    for bn in roles.bns():
        if bn not in seen:
            refusal = bn_call_refusal(bn, calls) or Refusal(
                bn, Code.UNTRACEABLE, f"module not traceable and {bn} is not inside nn.Sequential"
            )
            scan.refused.append(refusal)
    return scan


def _match_in_sequential(
    path: str, seq: nn.Sequential, roles: Roles, calls: Calls
) -> list[tuple[str, Pair | Refusal]]:
    """Each BN child of ``seq`` with its pair or refusal: after its neighbour, else before."""
    out: list[tuple[str, Pair | Refusal]] = []
    prefix = f"{path}." if path else ""
    # A folded BN is an nn.Identity: look through it, so Conv -> BN -> BN folds twice.
    children = [
        (roles.canonical[prefix + name], child)
        for name, child in seq.named_children()
        if type(child) is not nn.Identity
    ]
    for i, (bn, _) in enumerate(children):
        if roles.of(bn) != BN:
            continue
        if refusal := bn_call_refusal(bn, calls):
            out.append((bn, refusal))
            continue
        after: Pair | Refusal
        if i == 0:
            after = Refusal(bn, Code.UNTRACEABLE, f"{bn} is first in {path or 'the root'}")
        else:
            after = _sequential_after(path, children[:i], bn, roles, calls)
        if isinstance(after, Refusal):
            after = prefer_before(after, _sequential_before(path, children[i:], roles, calls))
        out.append((bn, after))
    return out


_SEQUENTIAL_RESHAPES = (nn.Flatten, nn.Unflatten)


def _sequential_after(
    seq: str, earlier: list[tuple[str, nn.Module]], bn: str, roles: Roles, calls: Calls
) -> Pair | Refusal:
    """``linear, BN`` or ``linear, nn.Flatten|nn.Unflatten, BN`` as neighbours before ``bn``."""
    prev, prev_mod = earlier[-1]
    if isinstance(prev_mod, _SEQUENTIAL_RESHAPES) and len(earlier) > 1:
        linear = earlier[-2][0]
        if roles.of(linear) == LINEAR:
            pair = Pair.of(linear, bn, _FINDER, between=prev)
            return _only_through(seq, pair, calls) or pair
    return _sequential_pair(seq, prev, prev_mod, bn, roles, calls)


def _sequential_before(
    seq: str, rest: list[tuple[str, nn.Module]], roles: Roles, calls: Calls
) -> Pair | Refusal | None:
    """``BN, linear`` or ``BN, nn.Flatten|nn.Unflatten, linear`` as neighbours.

    ``rest[0]`` is the BN.
    """
    bn, nxt, between = rest[0][0], rest[1:], ""
    if len(nxt) > 1 and isinstance(nxt[0][1], _SEQUENTIAL_RESHAPES):
        between, nxt = nxt[0][0], nxt[1:]
    if not nxt or roles.of(nxt[0][0]) != LINEAR:
        return None
    pair = Pair.of(nxt[0][0], bn, _FINDER, before=True, between=between)
    return _only_through(seq, pair, calls) or pair


def _sequential_pair(
    seq: str, prev: str, prev_mod: nn.Module, bn: str, roles: Roles, calls: Calls
) -> Pair | Refusal:
    """``prev, bn`` as neighbours: a pair if ``prev`` is linear, else why not."""
    site = site_label(prev, bn)
    kind = type(prev_mod).__name__
    if roles.of(prev) == LINEAR:
        pair = Pair.of(prev, bn, _FINDER)
        return _only_through(seq, pair, calls) or pair
    if is_nonlinear(kind):
        return Refusal(site, Code.NONLINEAR_INPUT, f"{bn} follows {kind}")
    if roles.of(prev) == BN:
        return Refusal(site, Code.STANDALONE, f"{bn} follows BatchNorm {prev}")
    return Refusal(site, Code.UNTRACEABLE, f"{bn} follows {kind}, which is not traced")


def _only_through(seq: str, pair: Pair, calls: Calls) -> Refusal | None:
    """Why neighbours in ``seq`` may have run outside it (None if every call was in it)."""
    runs = calls.of(seq)
    if calls.of(pair.bn) != runs:
        detail = f"{pair.bn} ran {calls.of(pair.bn)} times, {seq or 'the root'} {runs}"
        return pair.refusal(Code.UNTRACEABLE, f"{detail}: it is also called directly")
    if calls.of(pair.linear) != runs:
        detail = reused_detail(pair.linear, calls.of(pair.linear), pair.bn, runs)
        return pair.refusal(Code.REUSED_MODULE, detail)
    return None
