"""In-place operations in a user's forward (`edgecl.arch.fx_inplace`): every form torch runs in place either converts
to what torch computes (module parity through the torch forward and ONNX Runtime) or is refused with a UsageError
naming the call — never a network that silently drops or misplaces the write. Before the rewiring covered them, every
case here but the chain, the view after the call, ``+=`` on a shape and ``detach`` (refused as an unknown op)
converted to another network: a dropped ``relu_``, ``y = x; x *= g`` reading the old ``x``, a write into a view
lost; and before ``**=`` was recorded in place, ``y = x; x **= 2`` read the old ``x`` (``pow_`` and ``square_``
were refused as unknown ops)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch_nets import check_parity

from edgecl.arch import from_torch
from edgecl.errors import UsageError


class _Net(nn.Module):
    """conv → `step` (the in-place code under test) → mean → linear."""

    def __init__(self, step):
        from timm.layers import DropPath  # after conftest's torchvision imports

        super().__init__()
        self.conv, self.fc, self.step = nn.Conv2d(2, 4, 3, padding=1), nn.Linear(4, 3), step
        self.g = nn.Parameter(torch.tensor(3.0))
        self.act, self.drop, self.drop_path = nn.ReLU(inplace=True), nn.Dropout(0.2), DropPath(0.2)

    def forward(self, x):
        return self.fc(self.step(self, self.conv(x)).mean((2, 3)))


def _relu_method(s, out):
    out.relu_()  # result dropped: fx had no reader, the relu vanished
    return out


def _relu_kept(s, out):
    y = out
    out.relu_()
    return y - 0.5 * out  # y IS out after the call


def _sigmoid_method(s, out):
    out.sigmoid_()
    return out


def _neg_method(s, out):
    out.neg_()
    return out


def _functional_inplace(s, out):
    F.relu(out, inplace=True)
    return out


def _functional_inplace_positional(s, out):
    F.relu(out, True)
    return out


def _module_inplace_alias(s, out):
    z = s.act(out)  # nn.ReLU(inplace=True): out is relu'd too
    return out + z


def _augmented_mul_alias(s, out):
    y = out
    out *= s.g  # torch: in place, y changes too
    return y + out


def _augmented_add_alias(s, out):
    y = out
    out += 1.0
    return y * out


def _augmented_pow_alias(s, out):
    y = out
    out **= 2  # torch: in place (Tensor.__ipow__), y is squared too; fx's fallback out = out ** 2 left y as it was
    return y + out


def _pow_method(s, out):
    out.pow_(2)  # MetaFormer's x² written in place
    return out


def _square_kept(s, out):
    y = out
    out.square_()
    return y - 0.5 * out


def _augmented_on_shape(s, out):
    h = out.shape[2]
    k = h
    h += 1  # a Python number: rebinding, k keeps the old value
    return out * float(h - k)


def _chain(s, out):
    out.mul_(s.g)
    out.add_(1.0)
    out.div_(2.0)
    return out


def _view_after(s, out):
    out.mul_(s.g)
    return out.view(out.shape[0], 4, 5, 5)


CONVERTED = [_relu_method, _relu_kept, _sigmoid_method, _neg_method, _functional_inplace,
             _functional_inplace_positional, _module_inplace_alias, _augmented_mul_alias, _augmented_add_alias,
             _augmented_on_shape, _chain, _view_after, _augmented_pow_alias, _pow_method, _square_kept]


@pytest.mark.parametrize("step", CONVERTED, ids=lambda f: f.__name__)
def test_in_place_code_converts_to_what_torch_computes(step):
    torch.manual_seed(0)
    net = _Net(step).eval()
    spec = from_torch(net, (2, 5, 5))
    check_parity(net, spec, (2, 5, 5))  # torch forward within 1e-5, ONNX Runtime within 1e-4 of the module


def _write_into_slice(s, out):
    out[:, :2].mul_(s.g)  # writes into out's first two channels
    return out


def _view_taken_before(s, out):
    v = out.view(out.shape[0], 4, 5, 5)
    out.mul_(s.g)  # v sees the product
    return v * 1.0


def _write_into_view(s, out):
    v = out.view(out.shape[0], 4, 5, 5)
    v.mul_(s.g)
    return out


def _write_into_detached(s, out):
    out.detach().mul_(2.0)  # the same memory as out
    return out


def _write_through_dropout(s, out):
    y = s.drop(out)  # eval: out itself
    y += 1.0
    return y + out


def _write_through_drop_path(s, out):
    y = s.drop_path(out)  # timm's DropPath, eval: out itself
    y.mul_(s.g)
    return y + out


def _square_through_dropout(s, out):
    y = s.drop(out)  # eval: out itself
    y **= 2
    return y + out


def _write_into_parameter(s, out):
    return out * s.g.mul_(1.0)


SHARED = "writes into memory that .* shares and reads after it"
REFUSED = {_write_into_slice: SHARED, _view_taken_before: SHARED, _write_into_view: SHARED,
           _write_into_detached: SHARED, _write_through_dropout: SHARED, _write_through_drop_path: SHARED,
           _write_into_parameter: "module's own tensor 'g'", _square_through_dropout: SHARED}


@pytest.mark.parametrize("step", list(REFUSED), ids=lambda f: f.__name__)
def test_in_place_writes_the_graph_cannot_express_are_refused(step):
    with pytest.raises(UsageError, match=REFUSED[step]) as info:
        from_torch(_Net(step).eval(), (2, 5, 5))
    assert any(call in str(info.value) for call in ("mul_", "iadd", "ipow")) and \
        "test_fx_inplace.py" in str(info.value)  # the call and the user's line


def test_a_view_read_only_before_the_call_is_fine():
    def step(s, out):
        a = out.view(out.shape[0], 4, 5, 5) * 2.0
        out.mul_(s.g)
        return a + out

    net = _Net(step).eval()
    check_parity(net, from_torch(net, (2, 5, 5)), (2, 5, 5))
