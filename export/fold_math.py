"""The fold math, on plain arrays: numpy only (no torch), float64 throughout. Both fold passes call
it — the fx pass (export/fold.py) on a module's weights, the ONNX graph pass (export/onnx_fold.py) on
a graph's initializers — and each rounds the float64 result once to its model's dtype.

In eval mode a BatchNorm is a per-channel affine map  y = x·s + t  with

    s = γ / √(σ² + ε),   t = β − μ·s         (γ = 1, β = 0 when affine=False)

Backward fold, BN right after a layer (y = BN(W·x + b)):

    W' = W·s  (scale each output channel),   b' = b·s + t   (b = 0 when the layer has no bias)

Forward fold, BN before the next layer (z = W·BN(x) + b), as in Keras' Dense/Conv2D examples
where BN sits after the activation:

    W' = W·s  (scale each input channel),    b' = b + W·t

A grouped weight holds channels per group (grouped_channels); a ConvTranspose keeps its output
channels on axis 1, within each group.
"""
import numpy as np

CONV_TRANSPOSE_FORWARD = ("a BN before a transposed conv does not fold into it: its kernel covers the output "
                          "positions unevenly (at the borders and between strides), so the BN shift would not "
                          "become one bias per output channel")


def affine_of_bn(gamma, beta, mean, var, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """A BatchNorm in eval mode as y = x·s + t per channel: s = γ/√(σ²+ε), t = β − μ·s (float64)."""
    gamma, beta, mean, var = (np.asarray(a, dtype=np.float64) for a in (gamma, beta, mean, var))
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


def grouped_channels(n_major: int, n_minor: int, groups: int) -> np.ndarray:
    """[n_major, n_minor] channel numbers along a grouped weight axis: index i of the major axis is
    in group g = i // (n_major/groups), whose channels are g·n_minor … g·n_minor + n_minor − 1."""
    group = np.arange(n_major) // (n_major // groups)
    return group[:, None] * n_minor + np.arange(n_minor)[None, :]


def fold_backward_arrays(weight, bias, scale, shift, out_axis: int = 0, groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """BN after the layer, y = (W·x + b)·s + t:  W' = W·s along the output channels, b' = b·s + t.
    `bias` None means no bias. A ConvTranspose keeps its weight as [in, out/groups, k…]
    (out_axis=1, groups > 1): the output channel of W[i, j] is g·(out/groups) + j for the group
    g of input i. Returns float64 arrays."""
    weight = np.asarray(weight, dtype=np.float64)
    scale, shift = np.asarray(scale, dtype=np.float64), np.asarray(shift, dtype=np.float64)
    if out_axis == 0 or groups == 1:
        if scale.size != weight.shape[out_axis]:
            raise ValueError(f"{scale.size} channels do not match weight axis {out_axis} of {weight.shape}")
        view = [1] * weight.ndim
        view[out_axis] = -1
        s = scale.reshape(view)
    else:
        channel = grouped_channels(weight.shape[0], weight.shape[1], groups)
        if scale.size != weight.shape[1] * groups:
            raise ValueError(f"{scale.size} channels do not match {groups} groups of {weight.shape[1]}")
        s = scale[channel].reshape(channel.shape + (1,) * (weight.ndim - 2))
    bias = np.zeros(scale.size) if bias is None else np.asarray(bias, dtype=np.float64)
    return weight * s, bias * scale + shift


def fold_forward_arrays(weight, bias, scale, shift, out_axis: int = 0, in_axis: int = 1,
                        groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """BN before the layer, z = W·(x·s + t) + b:  W' = W·s along the input axis, b' = b + Σ W·t
    (summed over every axis but the output one). `scale`/`shift` hold one value per input of the
    whole layer (all groups); a grouped conv's output channel o reads inputs g·k … g·k+k−1 of
    group g = o // (out/groups), with k = in/groups. Returns float64 arrays."""
    weight = np.moveaxis(np.asarray(weight, dtype=np.float64), (out_axis, in_axis), (0, 1))  # [out, in/g, ...]
    scale, shift = np.asarray(scale, dtype=np.float64), np.asarray(shift, dtype=np.float64)
    out_channels, in_per_group = weight.shape[:2]
    channel = grouped_channels(out_channels, in_per_group, groups)  # [out, in/g]
    spatial = (1,) * (weight.ndim - 2)
    s, t = scale[channel].reshape(*channel.shape, *spatial), shift[channel].reshape(*channel.shape, *spatial)
    bias = np.zeros(out_channels) if bias is None else np.asarray(bias, dtype=np.float64)
    new_bias = bias + (weight * t).reshape(out_channels, -1).sum(1)
    return np.moveaxis(weight * s, (0, 1), (out_axis, in_axis)), new_bias


def affine_of_elementwise(op: str, const, const_first: bool = False):
    """Add/Sub/Mul/Div of a tensor x with a constant c (as exporters write a BatchNorm: Keras' Sub →
    Mul → Add) as y = x·s + t, with s and t shaped like c (float64). None for c / x, which is not
    affine, and for x / c with a zero in c."""
    c = np.asarray(const, dtype=np.float64)
    one, zero = np.ones_like(c), np.zeros_like(c)
    if op == "Add":
        return one, c
    if op == "Sub":
        return (-one, c) if const_first else (one, -c)
    if op == "Mul":
        return c, zero
    if op == "Div" and not const_first and np.all(c != 0):
        return 1.0 / c, zero
    return None


def compose_affine(first, then) -> tuple[np.ndarray, np.ndarray]:
    """x·s₁ + t₁, then ·s₂ + t₂:  x·(s₁·s₂) + (t₁·s₂ + t₂) (broadcasting)."""
    (s1, t1), (s2, t2) = first, then
    return np.asarray(s1, dtype=np.float64) * s2, np.asarray(t1, dtype=np.float64) * s2 + t2
