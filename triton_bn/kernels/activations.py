"""Activation epilogues as compile-time selected ``(act, act_grad)`` pairs.

``ACTIVATION`` is a ``tl.constexpr`` id (the table lives in ``triton_bn/activations.py``), so every
branch below except one is removed at compile time: the identity costs nothing.

Both functions take the pre-activation ``z`` in fp32. The backward never stores ``z``: it recomputes
it from x and the per-channel statistics and calls ``activation_grad(z)`` (see the module docstrings
of ``channels_last.py`` / ``channels_first.py``).

NaN handling follows PyTorch: relu-like activations are written with ``tl.where(z < 0, ...)`` so that
a NaN (for which every comparison is false) passes through unchanged, as ``torch.relu(nan)`` does.
Subgradients at kinks follow PyTorch's own backward formulas (relu'(0) = 0, leaky_relu'(0) = slope,
relu6' = 0 at 0 and 6, hardswish'(-3) = 0 and hardswish'(3) = 1).
"""
import triton
import triton.language as tl

from ..activations import TABLE as ACTIVATION_TABLE

# The ids, named as in the table (triton_bn/activations.py), from which they are read: the branches below
# compare ACTIVATION with these names, never with a number.
_IDS = {a.constant: a.id for a in ACTIVATION_TABLE}
IDENTITY = tl.constexpr(_IDS["IDENTITY"])
RELU = tl.constexpr(_IDS["RELU"])
LEAKY_RELU = tl.constexpr(_IDS["LEAKY_RELU"])
RELU6 = tl.constexpr(_IDS["RELU6"])
SILU = tl.constexpr(_IDS["SILU"])
GELU = tl.constexpr(_IDS["GELU"])
GELU_TANH = tl.constexpr(_IDS["GELU_TANH"])
HARDSWISH = tl.constexpr(_IDS["HARDSWISH"])
SIGMOID = tl.constexpr(_IDS["SIGMOID"])
_MISSING = set(_IDS) - {name for name, value in globals().items() if isinstance(value, tl.constexpr)}
assert not _MISSING, f"kernels/activations.py has no constant for {sorted(_MISSING)}: every activation of the " \
    "table needs one here, and a branch in both functions below (docs/adding-an-activation.md)"

# The float constants below are written as literals inside the functions: the compiler rejects plain
# float globals in @triton.jit code, and the interpreter mishandles tl.constexpr float globals that
# multiply tensors (tests/test_compile_sm90.py compiles every kernel, the other tests interpret them):
#   0.7071067811865476 = 1 / sqrt(2)      0.3989422804014327 = 1 / sqrt(2 pi)
#   0.7978845608028654 = sqrt(2 / pi)     0.044715 = the tanh-GELU cubic coefficient


@triton.jit
def _sigmoid(z):
    # exp(-z) overflows to inf for z < -88 in fp32, and 1 / (1 + inf) = 0 is the right limit.
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _tanh(u):
    # tanh(u) = 1 - 2 / (exp(2u) + 1): both limits are exact in fp32 (exp -> inf gives 1, exp -> 0 gives -1).
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def apply_activation(z, ACTIVATION: tl.constexpr, negative_slope):
    """act(z) for fp32 ``z``."""
    out = z
    if ACTIVATION == RELU:  # relu
        out = tl.where(z < 0.0, 0.0, z)
    elif ACTIVATION == LEAKY_RELU:  # leaky_relu
        out = tl.where(z < 0.0, z * negative_slope, z)
    elif ACTIVATION == RELU6:  # relu6
        out = tl.where(z < 0.0, 0.0, tl.where(z > 6.0, 6.0, z))
    elif ACTIVATION == SILU:  # silu
        out = z * _sigmoid(z)
    elif ACTIVATION == GELU:  # gelu (erf)
        out = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACTIVATION == GELU_TANH:  # gelu (tanh approximation)
        out = 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    elif ACTIVATION == HARDSWISH:  # hardswish
        out = z * tl.where(z < -3.0, 0.0, tl.where(z > 3.0, 6.0, z + 3.0)) / 6.0
    elif ACTIVATION == SIGMOID:  # sigmoid
        out = _sigmoid(z)
    return out


@triton.jit
def activation_grad(z, ACTIVATION: tl.constexpr, negative_slope):
    """d act(z) / dz for fp32 ``z``, with PyTorch's choices at the kinks."""
    out = tl.full(z.shape, 1.0, tl.float32)
    if ACTIVATION == RELU:  # relu: torch uses (result > 0), so 0 at z == 0
        out = tl.where(z > 0.0, 1.0, 0.0)
    elif ACTIVATION == LEAKY_RELU:  # leaky_relu: torch uses (z > 0 ? 1 : slope)
        out = tl.where(z > 0.0, 1.0, negative_slope)
    elif ACTIVATION == RELU6:  # relu6 = hardtanh(0, 6): zero gradient at and beyond both ends
        out = tl.where((z > 0.0) & (z < 6.0), 1.0, 0.0)
    elif ACTIVATION == SILU:  # silu
        s = _sigmoid(z)
        out = s * (1.0 + z * (1.0 - s))
    elif ACTIVATION == GELU:  # gelu (erf)
        out = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACTIVATION == GELU_TANH:  # gelu (tanh)
        t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        inner_grad = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
        out = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * inner_grad
    elif ACTIVATION == HARDSWISH:  # hardswish: torch gives 0 for z <= -3 and 1 for z >= 3 (checked in the tests)
        out = tl.where(z <= -3.0, 0.0, tl.where(z >= 3.0, 1.0, z / 3.0 + 0.5))
    elif ACTIVATION == SIGMOID:  # sigmoid
        s = _sigmoid(z)
        out = s * (1.0 - s)
    return out
