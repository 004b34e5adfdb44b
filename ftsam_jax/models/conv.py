"""A drop-in `lax.conv_general_dilated` whose weight gradient can be computed as matmuls.

For a 2-D convolution y = conv(x, w) (NHWC input, HWIO kernel, stride s, padding p), the
weight gradient is

    dL/dw[i, j] = sum over (n, h, w) of  x_p[n, s*h + i, s*w + j, :]^T  dy[n, h, w, :]

with x_p the padded input: one (Cin x Cout) matrix product per kernel tap (i, j) over the
tap's shifted, strided slice of x_p. `conv_general_dilated` computes the forward pass and the
input gradient with XLA's own convolution and, where the policy says so, the weight gradient
with those matmuls (a `jax.custom_vjp`); results equal the native gradient to float rounding
(tests/test_conv.py).

Policy (`FTSAM_JAX_CONV_WGRAD`, read when a model is traced):
  - `auto` (default): matmuls for 1x1 kernels on CPU (1.6-5x faster there, every stride),
    XLA's convolution otherwise. Measured on a 2-core Xeon (AVX-512) with jaxlib 0.10.2 and
    `ftsam_jax.xla.CPU_OPTIONS`: for 3x3 kernels XLA's weight-gradient convolution was 2-3x
    faster than nine shifted matmuls at every PreAct-ResNet18 layer shape (BENCHMARKS.md), so
    `auto` keeps it there.
  - `matmul`: matmuls for every kernel on CPU (for machines where XLA's weight-gradient
    convolution is the slow part: on a 2-core AMD EPYC it was up to 8x slower than the matmuls).
  - `native`: XLA's convolution everywhere (A/B runs).
Accelerators always use XLA's convolution. Only ungrouped, undilated 2-D NHWC/HWIO
convolutions take the matmul path; anything else falls through to `lax.conv_general_dilated`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

ENV_WGRAD = "FTSAM_JAX_CONV_WGRAD"
WGRAD_MODES = ("auto", "matmul", "native")
_NHWC = ("NHWC", "HWIO", "NHWC")

Pads = tuple[tuple[int, int], ...]


def wgrad_mode() -> str:
    """The weight-gradient policy from the environment; ValueError for an unknown value."""
    mode = os.environ.get(ENV_WGRAD, "auto").strip().lower() or "auto"
    if mode not in WGRAD_MODES:
        raise ValueError(f"{ENV_WGRAD}={mode!r} is not one of {list(WGRAD_MODES)}")
    return mode


def use_matmul_wgrad(kernel_shape: Sequence[int], mode: str | None = None,
                     backend: str | None = None) -> bool:
    """Whether a convolution with this HWIO kernel takes the matmul weight gradient."""
    mode = wgrad_mode() if mode is None else mode
    if (backend or jax.default_backend()) != "cpu" or mode == "native":
        return False
    return mode == "matmul" or tuple(kernel_shape[:2]) == (1, 1)


def _native(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: Pads) -> jax.Array:
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC)


def weight_gradient(x: jax.Array, dy: jax.Array, kernel_hw: tuple[int, int],
                    strides: tuple[int, int], pads: Pads) -> jax.Array:
    """dL/dw (HWIO, float32) of `conv(x, w)` from the output cotangent, as one matmul a tap."""
    kh, kw = kernel_hw
    sh, sw = strides
    n, ho, wo, cout = dy.shape
    cin = x.shape[-1]
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    dy2 = dy.reshape(-1, cout)
    taps = []
    for i in range(kh):
        for j in range(kw):
            xs = lax.slice(xp, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, cin),
                           (1, sh, sw, 1))
            taps.append(jnp.matmul(xs.reshape(-1, cin).T, dy2,
                                   preferred_element_type=jnp.float32))
    return jnp.stack(taps).reshape(kh, kw, cin, cout)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_matmul_wgrad(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: Pads
                      ) -> jax.Array:
    """NHWC/HWIO convolution; its VJP takes dx from XLA and dw from `weight_gradient`."""
    return _native(x, w, strides, pads)


def _fwd(x, w, strides, pads):
    return _native(x, w, strides, pads), (x, w)


def _bwd(strides, pads, res, dy):
    x, w = res
    _, vjp_x = jax.vjp(lambda x_: _native(x_, w, strides, pads), x)
    (dx,) = vjp_x(dy)
    dw = weight_gradient(x, dy, w.shape[:2], strides, pads)
    return dx, dw.astype(w.dtype)


conv_matmul_wgrad.defvjp(_fwd, _bwd)


def _is_nhwc(dimension_numbers: Any) -> bool:
    if dimension_numbers is None:
        return False
    if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        return tuple(dimension_numbers) == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
    return tuple(dimension_numbers) == _NHWC


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: str | Sequence[tuple[int, int]],
                         lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None) -> jax.Array:
    """`lax.conv_general_dilated` with the same signature (what `flax.linen.Conv` takes as
    `conv_general_dilated`); 2-D NHWC convolutions follow the weight-gradient policy."""
    plain = (lhs.ndim == 4 and _is_nhwc(dimension_numbers) and feature_group_count == 1
             and batch_group_count == 1 and precision is None and preferred_element_type is None
             and all(d == 1 for d in (lhs_dilation or (1, 1)))
             and all(d == 1 for d in (rhs_dilation or (1, 1))))
    if not (plain and use_matmul_wgrad(rhs.shape)):
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, precision, preferred_element_type)
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        pads = tuple(lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding))
    else:
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    if min(min(p) for p in pads) < 0:  # cropping pads: leave them to XLA
        return lax.conv_general_dilated(lhs, rhs, strides, pads,
                                        dimension_numbers=dimension_numbers)
    return conv_matmul_wgrad(lhs, rhs, strides, pads)
