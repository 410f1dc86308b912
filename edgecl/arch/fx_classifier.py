"""The final classifier of `from_torch`: found at the end of the converted graph and dropped, the tensor it reads
becoming the spec's output — the features that edgecl's per-task heads read instead.

Two forms are classifiers:

- one classifier: a final `nn.Linear`, or a 1×1 convolution on globally pooled features then a flatten (DLA's and
  DPN's), which is a linear layer on the pooled features;
- an average of classifiers: the sum of n ≥ 2 classifier chains times 1/n (``(head(x) + head_dist(x)) / 2``, as
  timm's RepViT, and the distilled heads of LeViT and EfficientFormer, compute in eval mode), every chain an
  optional BatchNorm (timm's NormLinear: BatchNorm1d → Dropout → Linear) then a classifier as above, all of them
  reading one tensor. Dropouts and identities are no-ops at inference (the converter drops them everywhere);
- DeiT's distilled head, ``(head(x[:, 0]) + head_dist(x[:, 1])) / 2``: linear classifiers each reading another
  token of one token map (or of several: CrossViT's two branches' class tokens, averaged as
  ``torch.mean(torch.stack(…, dim=0), dim=0)``, `fx_stack`). Its features are those tokens side by side (a ``cat``
  of the picked tokens, 2·C): one linear head of them computes the average exactly (weights [W₀, W₁] / 2), and
  edgecl's heads read them.

The rule for both: the features are the last tensor that every classifier reads, and what only a classifier reads
is dropped with it. So a BatchNorm that belongs to one chain of an average is part of that chain's classifier and is
dropped with it (the heads replace the whole average; its tensors are never a trunk tensor, so starting weights
neither need nor take them), while the BatchNorm1d before a single classifier is what that classifier reads and stays
in the trunk, as before (its running statistics load as starting weights like any BatchNorm's). A BatchNorm that all
chains read is trunk either way. Anything else at the end — a weighted sum, chains reading different tensors, a chain
with an activation — is refused naming the op and the user's source line.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from torch import fx

from edgecl.arch.fx_calls import location, shape_of
from edgecl.arch.ops import ACTIVATIONS
from edgecl.arch.spec import INPUT
from edgecl.errors import UsageError

_TRUNK_HINT = ("Pass the trunk instead: a module returning (batch, features), with from_torch(trunk, input_shape, "
               "classifier=False) (CLI: --arch module:factory --no-classifier)")


class _ClassifierConverter:
    """Mixin of `fx_import._Converter`: detects and drops the model's final classifier (see the module docstring)."""

    name: str
    nodes: list[dict[str, Any]]
    alias: dict[fx.Node, str]
    _node_named: Callable[[str], dict[str, Any] | None]
    _unique: Callable[[str], str]

    def drop_classifier(self, result: fx.Node) -> str:
        """The name of the spec node whose output feeds the heads; the classifier (or the averaged classifiers)
        removed. `result` is the fx node the module returns."""
        self.pointwise: set[str] = set()  # the flattens `_classifier` makes of a pointwise convolution's input
        out, last = shape_of(result), self._node_named(self.alias[result])
        terms = self._averaged(last)
        if terms is None:
            linear = self._classifier(last, out)
            if linear is None or linear["op"] != "linear":
                self._refuse_activated_conv(last)
                raise self._not_a_classifier("the model's last operation", last, "an nn.Linear classifier (or a 1×1 "
                                             "convolution on pooled features, then a flatten, or an average of such "
                                             "classifiers)")
            self.nodes.remove(linear)
            return self._trunk_left(linear["inputs"][0], [linear])
        chains = [self._chain(term, out) for term in terms]
        tokens = self._tokens_read([read for _, read, mapped in chains if not mapped])
        if tokens is not None and len(tokens) == len(chains):  # DeiT's class and distillation tokens, side by side
            features = self._unique("tokens.features")
            self.nodes.append({"name": features, "op": "cat", "inputs": tokens})
            return features
        if len({(read, mapped) for _, read, mapped in chains}) != 1:
            reads = "; ".join(f"{linear.get('module', linear['name'])} reads {read}{self._where(read)}"
                              for linear, read, _ in chains)
            raise UsageError(f"{self.name}: the model ends in an average of {len(chains)} classifiers that read "
                             f"different tensors ({reads}); edgecl replaces an average of classifiers only where "
                             "every one reads the same features (an optional BatchNorm and dropout of its own, then "
                             f"its nn.Linear). {_TRUNK_HINT}")
        _, features, mapped = chains[0]
        features = self._trunk_left(features, [linear for linear, _, _ in chains])
        if mapped:  # 1×1 convolutions on a pooled map: their features are the map, flattened
            flat = self._unique(f"{features}.features")
            self.nodes.append({"name": flat, "op": "flatten", "inputs": [features]})
            return flat
        return features

    def _averaged(self, last: dict[str, Any] | None) -> list[dict[str, Any]] | None:
        """The terms of a final sum · (1/n), or None where the model does not end in a scaled sum."""
        top = self._node_named(last["inputs"][0]) if last is not None and last["op"] == "scale" else None
        if top is None or top["op"] != "add" or last.get("offset", 0.0) != 0.0:
            return None
        terms = self._terms(top)
        factor = float(last.get("factor", 1.0))
        if not math.isclose(factor * len(terms), 1.0, rel_tol=1e-6):
            raise UsageError(f"{self.name}: the model ends in a sum of {len(terms)} terms times {factor:g} "
                             f"{self._where(last['name']).strip()}; an average of classifiers is supported as their "
                             f"sum divided by their number ({len(terms)}), not a weighted sum. {_TRUNK_HINT}")
        return terms

    def _tokens_read(self, reads: list[str]) -> list[str] | None:
        """`reads` when they are two or more different tokens, each picked and flattened (DeiT's
        ``(head(x[:, 0]) + head_dist(x[:, 1])) / 2`` of one token map; CrossViT's class tokens of its two branches,
        of two widths): the heads' features are then those tokens side by side, an average of classifiers being one
        classifier of them (weights [W₀, W₁] / 2, bias the mean). None otherwise."""
        picks = [self._node_named(r) for r in reads]
        tokens = [self._node_named(p["inputs"][0]) if p is not None and p["op"] == "flatten" else None for p in picks]
        if len(set(reads)) < 2 or len(set(reads)) != len(reads) or any(t is None or t["op"] != "token" for t in tokens):
            return None
        return reads

    def _terms(self, node: dict[str, Any] | None) -> list[dict[str, Any] | None]:
        """The summands of a tree of adds (a + b + c traces as (a + b) + c)."""
        if node is None or node["op"] != "add":
            return [node]
        return [t for name in node["inputs"] for t in self._terms(self._node_named(name))]

    def _chain(self, term: dict[str, Any] | None, out: list[int] | None) -> tuple[dict[str, Any], str, bool]:
        """One averaged classifier: (its linear node, the tensor its chain reads, whether through a pointwise
        convolution's flatten). A BatchNorm only this chain reads is part of it."""
        linear = self._classifier(term, out)
        if linear is None or linear["op"] != "linear":
            raise self._not_a_classifier("a term of the final average", term, "a classifier (an optional BatchNorm "
                                         "and dropout, then an nn.Linear, or a 1×1 convolution on pooled features and "
                                         "a flatten)")
        read = linear["inputs"][0]
        mapped = read in self.pointwise
        if mapped:
            read = self._node_named(read)["inputs"][0]
        node = self._node_named(read)
        if node is not None and node["op"] == "bn" and sum(read in n["inputs"] for n in self.nodes) == 1:
            read = node["inputs"][0]
        return linear, read, mapped

    def _classifier(self, last: dict[str, Any] | None, out: list[int] | None) -> dict[str, Any] | None:
        """`last` itself, or — a 1×1 convolution on the pooled 1×1 map, then a flatten (DLA's and DPN's classifier),
        is a linear layer on the pooled features — the pair made one: a flatten of the pooled map, then a linear."""
        conv = self._node_named(last["inputs"][0]) if last is not None and last["op"] == "flatten" else None
        if conv is None or conv["op"] != "conv" or out != [conv["out"]] or conv["k"] != [1, 1] or \
                conv["stride"] != [1, 1] or conv["pad"] != [0, 0] or conv["groups"] != 1:
            return last
        self.nodes.remove(last)
        self.nodes.remove(conv)
        pooled = self._unique(f"{conv['name']}.features")
        self.pointwise.add(pooled)
        self.nodes.append({"name": pooled, "op": "flatten", "inputs": conv["inputs"]})
        classifier = {"name": conv["name"], "op": "linear", "inputs": [pooled], "in": conv["in"], "out": conv["out"],
                      "bias": conv["bias"]}
        self.nodes.append(classifier)
        return classifier

    def _trunk_left(self, features: str, linears: list[dict[str, Any]]) -> str:
        if features == INPUT:
            layers = ", ".join(f"{n.get('module', n['name'])}: nn.Linear {n['in']}→{n['out']}" for n in linears)
            raise UsageError(f"{self.name}: the model is only its classifier ({layers}). edgecl replaces the final "
                             "nn.Linear with a head per task, which leaves no trunk; put at least one layer before "
                             "the classifier")
        return features

    def _refuse_activated_conv(self, last: dict[str, Any] | None) -> None:
        """SqueezeNet's classifier — a 1×1 convolution, an activation, global pooling, a flatten — is not linear in
        the pooled features, so no head can replace it; say so and how to keep it (as the trunk's last layer)."""
        chain, node = [], last
        for op in ("flatten", "gap"):
            if node is None or node["op"] != op:
                return
            chain.append(node)
            node = self._node_named(node["inputs"][0])
        conv = self._node_named(node["inputs"][0]) if node is not None and node["op"] in ACTIVATIONS else None
        if conv is None or conv["op"] != "conv" or conv["k"] != [1, 1]:
            return
        raise UsageError(f"{self.name}: the model ends in a 1×1 convolution classifier ({conv['name']}"
                         f"{self._where(conv['name'])}) with a {node['op']} between it and the pooling, so it is not "
                         "linear in the pooled features and a per-task head cannot replace it. Keep it as the trunk's "
                         f"last layer with from_torch(model, input_shape, classifier=False) (its {conv['out']} pooled "
                         "channels become the features the heads read; CLI: --no-classifier), or pass the trunk "
                         "before it (a module returning (batch, features)) with classifier=False")

    def _not_a_classifier(self, subject: str, node: dict[str, Any] | None, wanted: str) -> UsageError:
        """The refusal of a model whose end is not a classifier: what `node` is, where, and what edgecl wanted."""
        what = "the input" if node is None else f"{node['op']} ({node['name']}{self._where(node['name'])})"
        return UsageError(f"{self.name}: {subject} is {what}, not {wanted}. {_TRUNK_HINT}")

    def _where(self, name: str) -> str:
        """' (fx node, module path, source line)' of the fx node that computes spec node `name`, or ''."""
        node = next((n for n, alias in self.alias.items() if alias == name), None)
        return f" {location(node)}" if node is not None else ""
