"""The bad calls of ``triton_bn.batch_norm``, each with the exception type the README's Errors section
documents: one table that tests/test_seams.py draws from on every entry point and that tests/launch_child.py
runs through the C++ launch path and the Python path, which must give the same type and message.

``bad_calls(x, state)``: ``state`` holds a valid call's tensors (running_mean, running_var, weight, bias,
num_batches_tracked, residual), which every bad call passes unchanged except for the one thing it breaks (the
tensors it makes of its own are fresh, never one of ``state``'s). A test snapshots the raw bytes of every
tensor involved before the call and compares them after the error."""
import math

import torch


def tensors_of(state: dict, x: torch.Tensor):
    """Every tensor a call may write or read: the input and the state's."""
    return [x] + [t for t in state.values() if isinstance(t, torch.Tensor)]


def snapshot(tensors):
    """The raw bytes of each tensor's whole storage (what an error must leave exactly as it was), as a list of
    byte strings (None for a tensor without data: meta)."""
    raw = []
    for t in tensors:
        if t.device.type == "meta":
            raw.append(None)
            continue
        storage = torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.detach().untyped_storage())
        raw.append(storage.cpu().numpy().tobytes())
    return raw


def bad_calls(x: torch.Tensor, state: dict):
    """[(name, kwargs of batch_norm, exception type)]: each a call that must raise before any write."""
    c = x.shape[1]
    rm, rv, w, b = state["running_mean"], state["running_var"], state["weight"], state["bias"]
    nbt, residual = state["num_batches_tracked"], state["residual"]
    good = dict(input=x, running_mean=rm, running_var=rv, weight=w, bias=b, training=True, momentum=0.1,
                eps=1e-5, residual=residual, num_batches_tracked=nbt)

    def call(**changes):
        return {**good, **changes}

    per_channel_like = rv.detach()
    one_row = torch.randn(1, c, *([1] * (x.dim() - 2)))  # one value per channel
    return [
        ("weight of another length", call(weight=torch.ones(c + 1)), ValueError),
        ("bias of 2 dimensions", call(bias=torch.zeros(c, 1)), ValueError),
        ("integer weight", call(weight=torch.ones(c, dtype=torch.int64)), TypeError),
        ("weight on another device", call(weight=torch.ones(c, device="meta")), RuntimeError),
        ("only running_mean", call(running_var=None), ValueError),
        ("only running_mean, eval", call(running_var=None, training=False), ValueError),
        ("no running statistics in eval", call(running_mean=None, running_var=None, training=False), ValueError),
        ("eps 0 in training", call(eps=0.0), ValueError),
        ("negative eps in eval", call(eps=-1.0, training=False), ValueError),
        ("nan momentum", call(momentum=math.nan), ValueError),
        ("momentum None without a count", call(momentum=None, num_batches_tracked=None), ValueError),
        ("unknown activation", call(activation="tanh"), ValueError),
        ("negative_slope a string", call(activation="leaky_relu", negative_slope="0.1"), TypeError),
        ("residual of another shape", call(residual=torch.zeros(x.shape[0] + 1, *x.shape[1:])), ValueError),
        ("residual of another dtype", call(residual=torch.zeros(x.shape, dtype=torch.float64)), TypeError),
        ("residual a list", call(residual=[1.0]), TypeError),
        ("integer input", call(input=torch.ones(x.shape, dtype=torch.int32)), TypeError),
        ("complex input", call(input=torch.ones(x.shape, dtype=torch.complex64), residual=None), TypeError),
        ("1-D input", call(input=torch.ones(c)), ValueError),
        ("one value per channel in training", call(input=one_row, residual=None), ValueError),
        ("running_var of stride 0", call(running_var=torch.ones(1).expand(c)), ValueError),
        ("running_mean is running_var", call(running_var=rm), ValueError),
        ("running_var requires grad", call(running_var=per_channel_like.clone().requires_grad_()), ValueError),
        ("running_var requires grad, eval", call(running_var=per_channel_like.clone().requires_grad_(),
                                                 training=False), ValueError),
        ("num_batches_tracked of 2 elements", call(num_batches_tracked=torch.zeros(2, dtype=torch.long)),
         ValueError),
    ]
