"""torch.func through scan and recurrence: grad, jacrev, vmap (by the ops'
batching rules, not the slow per-sample fallback), vmap(grad), and forward
mode (right for scan, refused for recurrence), against the float64 references
under the same transforms."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import forward_ad
from torch.func import grad, jacfwd, jacrev, jvp, vmap

import mmrec_ops
from mmrec_ops.reference import recurrence_reference, scan_reference
from tests.helpers import DEVICES, assert_close_rel
from tests.ops.transforms import without_vmap_fallback

pytestmark = pytest.mark.parametrize("device", DEVICES)

TOLERANCE = 1e-12  # float64 kernels against the float64 loop references
V = 3  # size of the vmapped dimension
SCAN_SHAPE = (2, 7, 3)  # [B, T, D]
RECURRENCE_SHAPE = (2, 6, 3, 4)  # [B, T, H, d]
# (name, x given, h0 given): every way scan's defaults combine.
MODES = [("cumprod", False, False), ("x", True, False), ("x_h0", True, True), ("h0", False, True)]


def scan_inputs(device, with_x, with_h0, vmapped=()):
    """gamma in (0, 1), x and h0 standard normal, float64; a leading dim of V on the names in vmapped."""

    def draw(name, shape, uniform=False):
        shape = (V, *shape) if name in vmapped else shape
        return (
            torch.rand(shape, device=device, dtype=torch.float64)
            if uniform
            else torch.randn(shape, device=device, dtype=torch.float64)
        )

    B, _, D = SCAN_SHAPE
    return (
        draw("gamma", SCAN_SHAPE, uniform=True),
        draw("x", SCAN_SHAPE) if with_x else None,
        draw("h0", (B, D)) if with_h0 else None,
    )


def recurrence_inputs(device, vmapped=()):
    """z, gamma, weight, bias, h0 in float64, with a leading dim of V on the names in vmapped."""
    B, _, H, d = RECURRENCE_SHAPE
    shapes = {"z": RECURRENCE_SHAPE, "gamma": RECURRENCE_SHAPE, "weight": (H, d, d), "bias": (H, d), "h0": (B, H, d)}
    inputs = {}
    for name, shape in shapes.items():
        shape = (V, *shape) if name in vmapped else shape
        t = torch.randn(shape, device=device, dtype=torch.float64)
        inputs[name] = t.sigmoid() if name == "gamma" else t * 0.5 if name == "weight" else t
    return tuple(inputs.values())


def given(*tensors):
    """Positions of the tensors that are not None (the argnums to differentiate)."""
    return tuple(i for i, t in enumerate(tensors) if t is not None)


def assert_all_close(actual, expected, what):
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert_close_rel(a, e, TOLERANCE, what=f"{what}[{i}]")


@pytest.fixture
def no_vmap_fallback():
    with without_vmap_fallback():
        yield


def scan_loss(scan):
    """A scalar of scan's output that weighs every element differently."""

    def loss(gamma, x, h0, reverse):
        h = scan(gamma, x, h0, reverse)
        return (h * torch.linspace(-1, 2, h.numel(), device=h.device, dtype=h.dtype).view(h.shape)).sum()

    return loss


@pytest.mark.grad
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("mode", MODES, ids=[m[0] for m in MODES])
def test_scan_func_grad_and_jacrev(mode, reverse, device):
    _, with_x, with_h0 = mode
    inputs = scan_inputs(device, with_x, with_h0)
    argnums = given(*inputs)
    actual = grad(scan_loss(mmrec_ops.scan), argnums)(*inputs, reverse)
    expected = grad(scan_loss(scan_reference), argnums)(*inputs, reverse)
    assert_all_close(actual, expected, "grad")
    actual = jacrev(mmrec_ops.scan, argnums)(*inputs, reverse)
    expected = jacrev(scan_reference, argnums)(*inputs, reverse)
    assert_all_close(actual, expected, "jacrev")


# (name, which inputs are vmapped, the vmapped dim of each of gamma, x, h0)
SCAN_VMAPS = [
    ("gamma", ("gamma",), (0, None, None)),
    ("x_dim2", ("x",), (None, 2, None)),
    ("h0", ("h0",), (None, None, 0)),
    ("all_dim1", ("gamma", "x", "h0"), (1, 1, 1)),
]


def move_vmapped(inputs, vmapped_dims):
    """The inputs with their vmapped dim (leading, when any) moved to vmapped_dims."""
    return tuple(t if d is None else t.movedim(0, d) for t, d in zip(inputs, vmapped_dims))


@pytest.mark.ops
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("case", SCAN_VMAPS, ids=[c[0] for c in SCAN_VMAPS])
def test_scan_vmap_matches_reference(case, reverse, device, no_vmap_fallback):
    _, vmapped, vmapped_dims = case
    inputs = scan_inputs(device, True, True, vmapped)
    actual = vmap(mmrec_ops.scan, in_dims=(*vmapped_dims, None))(*move_vmapped(inputs, vmapped_dims), reverse)
    expected = vmap(
        scan_reference,
        in_dims=(
            0 if "gamma" in vmapped else None,
            0 if "x" in vmapped else None,
            0 if "h0" in vmapped else None,
            None,
        ),
    )(*inputs, reverse)
    assert_close_rel(actual, expected, TOLERANCE)


@pytest.mark.grad
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("mode", MODES, ids=[m[0] for m in MODES])
def test_scan_vmap_of_grad(mode, reverse, device, no_vmap_fallback):
    _, with_x, with_h0 = mode
    inputs = scan_inputs(device, with_x, with_h0, vmapped=("gamma", "x", "h0"))
    argnums = given(*inputs)
    in_dims = (*(None if t is None else 0 for t in inputs), None)
    actual = vmap(grad(scan_loss(mmrec_ops.scan), argnums), in_dims)(*inputs, reverse)
    expected = vmap(grad(scan_loss(scan_reference), argnums), in_dims)(*inputs, reverse)
    assert_all_close(actual, expected, "vmap(grad)")


@pytest.mark.grad
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("mode", MODES, ids=[m[0] for m in MODES])
def test_scan_forward_mode(mode, reverse, device):
    _, with_x, with_h0 = mode
    inputs = scan_inputs(device, with_x, with_h0)
    argnums = given(*inputs)
    primals = tuple(inputs[i] for i in argnums)
    tangents = tuple(torch.randn_like(p) for p in primals)

    def on_given(scan):
        def f(*given_inputs):
            full = list(inputs)
            for i, t in zip(argnums, given_inputs):
                full[i] = t
            return scan(*full, reverse)

        return f

    out, tangent = jvp(on_given(mmrec_ops.scan), primals, tangents)
    expected_out, expected_tangent = jvp(on_given(scan_reference), primals, tangents)
    assert_close_rel(out, expected_out, TOLERANCE)
    assert_close_rel(tangent, expected_tangent, TOLERANCE, what="jvp tangent")

    with forward_ad.dual_level():
        duals = tuple(forward_ad.make_dual(p, t) for p, t in zip(primals, tangents))
        dual_tangent = forward_ad.unpack_dual(on_given(mmrec_ops.scan)(*duals)).tangent
    assert dual_tangent is not None
    assert_close_rel(dual_tangent, expected_tangent, TOLERANCE, what="forward_ad tangent")

    actual = jacfwd(on_given(mmrec_ops.scan), tuple(range(len(primals))))(*primals)
    expected = jacrev(on_given(scan_reference), tuple(range(len(primals))))(*primals)
    assert_all_close(actual, expected, "jacfwd")


def recurrence_loss(recurrence):
    def loss(z, gamma, weight, bias, h0):
        return recurrence(z, gamma, weight, bias, h0).square().sum()

    return loss


@pytest.mark.grad
def test_recurrence_func_grad_and_jacrev(device):
    inputs = recurrence_inputs(device)
    argnums = tuple(range(5))
    actual = grad(recurrence_loss(mmrec_ops.recurrence), argnums)(*inputs)
    expected = grad(recurrence_loss(recurrence_reference), argnums)(*inputs)
    assert_all_close(actual, expected, "grad")
    actual = jacrev(mmrec_ops.recurrence, argnums)(*inputs)
    expected = jacrev(recurrence_reference, argnums)(*inputs)
    assert_all_close(actual, expected, "jacrev")


# (name, vmapped inputs, vmapped dim of each of z, gamma, weight, bias, h0).
# Shared weight and bias fold V into the batch; vmapped ones, into the heads.
RECURRENCE_VMAPS = [
    ("z", ("z",), (0, None, None, None, None)),
    ("z_gamma_h0_dim2", ("z", "gamma", "h0"), (2, 2, None, None, 2)),
    ("weight", ("weight",), (None, None, 0, None, None)),
    ("all_dim1", ("z", "gamma", "weight", "bias", "h0"), (1, 1, 1, 1, 1)),
]


@pytest.mark.ops
@pytest.mark.parametrize("case", RECURRENCE_VMAPS, ids=[c[0] for c in RECURRENCE_VMAPS])
def test_recurrence_vmap_matches_reference(case, device, no_vmap_fallback):
    _, vmapped, vmapped_dims = case
    inputs = recurrence_inputs(device, vmapped)
    actual = vmap(mmrec_ops.recurrence, in_dims=vmapped_dims)(*move_vmapped(inputs, vmapped_dims))
    reference_dims = tuple(None if d is None else 0 for d in vmapped_dims)
    expected = vmap(recurrence_reference, in_dims=reference_dims)(*inputs)
    assert_close_rel(actual, expected, TOLERANCE)


@pytest.mark.grad
@pytest.mark.parametrize("vmapped", [("z", "gamma"), ("weight", "bias", "h0")], ids=["data", "parameters"])
def test_recurrence_vmap_of_grad(vmapped, device, no_vmap_fallback):
    inputs = recurrence_inputs(device, vmapped)
    names = ("z", "gamma", "weight", "bias", "h0")
    in_dims = tuple(0 if name in vmapped else None for name in names)
    argnums = tuple(range(5))
    actual = vmap(grad(recurrence_loss(mmrec_ops.recurrence), argnums), in_dims)(*inputs)
    expected = vmap(grad(recurrence_loss(recurrence_reference), argnums), in_dims)(*inputs)
    assert_all_close(actual, expected, "vmap(grad)")


@pytest.mark.grad
def test_recurrence_forward_mode_is_refused(device):
    z, gamma, weight, bias, h0 = recurrence_inputs(device)
    message = "mmrec::recurrence has no forward-mode derivative"
    with pytest.raises(NotImplementedError, match=message):
        jvp(lambda w: mmrec_ops.recurrence(z, gamma, w, bias, h0), (weight,), (torch.randn_like(weight),))
    with pytest.raises(NotImplementedError, match=message):
        jacfwd(lambda z: mmrec_ops.recurrence(z, gamma, weight, bias, h0))(z)
    with forward_ad.dual_level(), pytest.raises(NotImplementedError, match=message):
        mmrec_ops.recurrence(forward_ad.make_dual(z, torch.randn_like(z)), gamma, weight, bias, h0)
