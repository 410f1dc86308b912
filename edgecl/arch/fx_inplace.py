"""In-place arithmetic methods in a traced graph (``out.mul_(self.skipinit_gain)`` in timm's NormFreeBlock).

Why: torch.fx records ``x.mul_(g)`` as a node whose result the code may drop, while the code's later reads of ``x``
stay on the node from before the call (pytorch issue 68301: the mutation is lost, timm marks the block untraceable
for that reason). Converted as recorded, NFNet's residual branch would skip its gain. `rewire_inplace` makes every
read of ``x`` after the call read the call's result, which is what the code computes."""
from __future__ import annotations

from torch import fx

INPLACE_METHODS = ("add_", "sub_", "mul_", "div_")  # the arithmetic `fx_calls` converts


def rewire_inplace(graph: fx.Graph) -> None:
    """Point each later user of an in-place method's operand at the method's node (in place, in graph order)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if node.op != "call_method" or node.target not in INPLACE_METHODS or not node.args:
            continue
        target = node.args[0]
        if not isinstance(target, fx.Node):
            continue
        for user in list(target.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(target, node)
