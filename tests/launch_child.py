"""Checks of the C++ launch path under the recording stand-in driver, run by tests/test_launch.py in a child
process (TRITON_BN_CUDA_DRIVER=record must be set before triton_bn is imported, and the Triton interpreter
must be off). CPU tensors take the C++ path there and every launch is recorded instead of made; each check
compares what C++ launched with what the Python launchers launch for the same call.

    python tests/launch_child.py CHECK        # prints "ok CHECK" or fails with an AssertionError
"""
import json
import os
import sys

assert os.environ.get("TRITON_BN_CUDA_DRIVER") == "record", "run with TRITON_BN_CUDA_DRIVER=record"
assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without the Triton interpreter"

import torch  # noqa: E402

import triton_bn  # noqa: E402
from triton_bn.backends import cpp_launch, cuda_driver, triton_kernels, triton_launch  # noqa: E402
from triton_bn.backends.layout import dense_geometry  # noqa: E402


def python_launches(call):
    """What the Python launchers launch for ``call()`` (watched, not run): per launch the kernel's name, the
    grid as three numbers, and each passed parameter as ("ptr", tensor), ("int", value) or ("f32", value),
    read off the compiled variant as cpp_launch.py reads it; plus call()'s result."""
    with triton_launch.watch(dry=True) as watched:
        result = call()
    launches = []
    for prepared, args in watched:
        compiled = cpp_launch.compiled_variant(prepared.kernel, prepared.grid, args, prepared.kwargs,
                                               torch.device("cpu"))
        params = []
        for name, arg in zip(prepared.kernel.arg_names, args):
            kind = compiled.signature[name]
            if kind == "constexpr":
                continue
            params.append(("ptr", arg) if kind.startswith("*") else ("f32", float(arg)) if kind == "fp32"
                          else ("int", int(arg)))
        params += [("ptr", None)] * compiled.scratch_pointers
        launches.append(dict(kernel=compiled.name, grid=list(prepared.grid) + [1] * (3 - len(prepared.grid)),
                             block=compiled.num_warps * 32, shared=compiled.shared, params=params))
    return launches, result


def assert_same_launches(recorded, expected, roles):
    """C++'s recorded launches against the Python launchers': kernels, grids, blocks, shared memory, every
    integer and fp32 parameter; a pointer parameter must be the same tensor: ``roles`` maps the address of a
    Python-side tensor to the address C++ must pass for that role (an input is its own; an output is the one
    C++ returned); the per-stream counters and the dummy are the same buffers on both sides; any other
    Python-side tensor is a scratch buffer, for which C++ must pass one buffer of its own, the same one
    wherever Python passes the same one."""
    assert [r["kernel"] for r in recorded] == [e["kernel"] for e in expected], (recorded, expected)
    scratch = {}
    standing = {t.data_ptr() for t in list(triton_launch._dummies.values()) + list(triton_launch._COUNTERS.values())}
    for got, want in zip(recorded, expected):
        where = want["kernel"]
        assert got["grid"] == want["grid"] and got["block"] == want["block"] and got["shared"] == want["shared"], where
        assert len(got["params"]) == len(want["params"]), where
        for index, (value, (kind, expected_value)) in enumerate(zip(got["params"], want["params"])):
            at = f"{where} parameter {index}"
            if kind == "int":
                assert value == {"int": expected_value}, (at, value, expected_value)
            elif kind == "f32":
                assert abs(value["f32"] - expected_value) <= 1e-6 * max(1.0, abs(expected_value)), (at, value,
                                                                                                   expected_value)
            elif expected_value is None:
                assert value == {"ptr": 0}, at  # a trailing scratch pointer Triton passes as null
            elif expected_value.data_ptr() in roles:
                assert value == {"ptr": roles[expected_value.data_ptr()]}, (at, value)
            elif expected_value.data_ptr() in standing:
                assert value == {"ptr": expected_value.data_ptr()}, at
            else:
                assert value["ptr"] != 0 and value["ptr"] not in roles.values(), at
                assert scratch.setdefault(expected_value.data_ptr(), value["ptr"]) == value["ptr"], at


def _roles(*pairs):
    """{address of the Python-side tensor: address C++ must pass} for (python tensor, C++ tensor) pairs."""
    return {a.data_ptr(): b.data_ptr() for a, b in pairs if a is not None}


def recorded_during(call):
    cuda_driver.clear()
    result = call()
    return cuda_driver.recorded(raw=True), result


# -- the checks --------------------------------------------------------------------------------------------------
SHAPES = {"channels_last": ((4, 6, 3, 5), torch.channels_last), "nchw": ((4, 6, 3, 5), torch.contiguous_format),
          "bn1d": ((12, 6), torch.contiguous_format), "bn3d": ((2, 6, 2, 3, 2), torch.channels_last_3d),
          "bn1d_length": ((3, 6, 7), torch.contiguous_format)}
MODULES = {2: triton_bn.BatchNorm1d, 3: triton_bn.BatchNorm1d, 4: triton_bn.BatchNorm2d, 5: triton_bn.BatchNorm3d}


def _input(layout, dtype=torch.float32, requires_grad=False):
    shape, memory_format = SHAPES[layout]
    x = torch.randn(shape).to(dtype).contiguous(memory_format=memory_format)
    return x.requires_grad_(requires_grad)


def check_training_forward(layout, activation, with_residual, grad):
    """A module's training forward: statistics and normalization, the batch counted, as Python launches them;
    with a gradient, the node and then its backward's launches as Python's backward launches them."""
    torch.manual_seed(0)
    x = _input(layout, requires_grad=grad)
    residual = torch.randn_like(x).requires_grad_(grad) if with_residual else None
    module = MODULES[x.dim()](x.shape[1], activation=activation)
    twin = MODULES[x.dim()](x.shape[1], activation=activation)
    twin.load_state_dict(module.state_dict())
    with torch.set_grad_enabled(grad):
        module(x, residual=residual)  # the first call of its kind: Python writes the plans
        recorded, y = recorded_during(lambda: module(x, residual=residual))
    assert recorded, "the C++ path did not take the call"
    act = triton_bn.activations.activation_id(activation)
    expected, (y_python, mean, invstd) = python_launches(lambda: triton_kernels.batch_norm_training(
        x.detach(), twin.running_mean, twin.running_var, twin.num_batches_tracked, twin.weight, twin.bias, residual,
        0.1, False, 1e-5, act, 0.01))
    roles = _roles((x, x), (residual, residual), (twin.weight, module.weight), (twin.bias, module.bias),
                   (twin.running_mean, module.running_mean), (twin.running_var, module.running_var),
                   (twin.num_batches_tracked, module.num_batches_tracked), (y_python, y))
    assert_same_launches(recorded, expected, roles)
    assert y.shape == x.shape and y.stride() == x.stride()
    if grad:
        _check_training_backward(x, residual, y, module, twin, mean, invstd, act)
    else:
        assert y.grad_fn is None  # no gradient needed: no node recorded


def _check_training_backward(x, residual, y, module, twin, mean, invstd, act):
    """The node a training forward recorded, then its backward's launches as Python's backward launches them."""
    assert y.grad_fn is not None and "BatchNormBackward" in y.grad_fn.name()
    grad_y = torch.randn_like(y)
    recorded, _ = recorded_during(lambda: y.backward(grad_y))
    mask = [True, True, True, residual is not None]
    kept = residual if act != 0 else None
    expected, grads = python_launches(lambda: triton_kernels.batch_norm_backward(
        grad_y, x.detach(), mean, invstd, None, twin.weight, twin.bias, kept, 1e-5, act, 0.01, mask))
    # mean and invstd: the node saved C++'s own (scratch on the Python side: C++ passes one buffer for each)
    roles = _roles((x, x), (grad_y, grad_y), (twin.weight, module.weight), (twin.bias, module.bias),
                   (grads[0], x.grad), (grads[1], module.weight.grad), (grads[2], module.bias.grad))
    if residual is not None:
        roles.update(_roles((residual, residual), (grads[3], residual.grad)))
    assert_same_launches(recorded, expected, roles)
    assert all(t.grad is not None for t in (x, module.weight, module.bias))


def check_eval_and_frozen(layout, activation):
    """Eval (the running statistics) and a FrozenBatchNorm table: one apply launch, as Python launches it."""
    torch.manual_seed(0)
    x = _input(layout)
    module = MODULES[x.dim()](x.shape[1], activation=activation).eval()
    with torch.no_grad():
        module(x)
        recorded, y = recorded_during(lambda: module(x))
        act = triton_bn.activations.activation_id(activation)
        expected, y_python = python_launches(lambda: triton_kernels.batch_norm_apply(
            x, module.running_mean, None, module.running_var, module.weight, module.bias, None, 1e-5, act, 0.01))
        assert recorded
        assert_same_launches(recorded, expected, _roles((x, x), (module.running_mean, module.running_mean),
                                                        (module.running_var, module.running_var),
                                                        (module.weight, module.weight), (module.bias, module.bias),
                                                        (y_python, y)))
        frozen = triton_bn.FrozenBatchNorm(torch.rand(x.shape[1]) + 0.5, torch.randn(x.shape[1]), activation)
        frozen(x)
        recorded, y = recorded_during(lambda: frozen(x))
        expected, y_python = python_launches(lambda: triton_kernels.batch_norm_apply(
            x, frozen._zeros, None, frozen._ones, frozen.scale, frozen.shift, None, 0.0, act, 0.01))
        assert recorded
        assert_same_launches(recorded, expected, _roles((x, x), (frozen._zeros, frozen._zeros),
                                                        (frozen._ones, frozen._ones), (frozen.scale, frozen.scale),
                                                        (frozen.shift, frozen.shift), (y_python, y)))


def check_sync_local_path():
    """SyncBatchNorm without a process group: the local path, the same launches as BatchNorm2d's."""
    torch.manual_seed(0)
    x = _input("channels_last")
    sync = triton_bn.SyncBatchNorm(6, activation="relu")
    with torch.no_grad():
        sync(x)
        recorded, _ = recorded_during(lambda: sync(x))
    assert [r["kernel"] for r in recorded] == ["_bn_fwd_stats_channels_last", "_bn_fwd_apply_channels_last"]


def check_node():
    """The node: only the gradients asked for (every needs_input_grad combination), saved-tensor hooks see x
    and the statistics, a hook on x's gradient fires, and create_graph is refused (once differentiable)."""
    torch.manual_seed(0)
    module = triton_bn.BatchNorm2d(6, activation="relu")
    for x_grad in (True, False):
        for weight_grad in (True, False):
            for residual_grad in (True, False, None):
                x = _input("channels_last", requires_grad=x_grad)
                residual = None if residual_grad is None else torch.randn_like(x).requires_grad_(residual_grad)
                module.weight.requires_grad_(weight_grad)
                module.weight.grad = module.bias.grad = None
                if not (x_grad or weight_grad or residual_grad):
                    module.bias.requires_grad_(True)
                y = module(x, residual=residual)
                y.backward(torch.ones_like(y))
                assert (x.grad is not None) == x_grad
                assert (module.weight.grad is not None) == weight_grad
                assert module.bias.grad is not None
                if residual is not None:
                    assert (residual.grad is not None) == residual_grad
    module.weight.requires_grad_(True)
    x = _input("channels_last", requires_grad=True)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        y = module(x)
    assert any(t.data_ptr() == x.data_ptr() for t in packed) and sum(t.dim() == 1 for t in packed) >= 2, packed
    seen = []
    x.register_hook(lambda g: seen.append(g.shape))
    y.backward(torch.ones_like(y))
    assert seen == [x.shape]
    x = _input("channels_last", requires_grad=True)
    y = module(x)
    (grad_x,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)  # a dy that requires grad
    try:
        grad_x.sum().backward()
    except RuntimeError as exc:
        assert "not differentiable again" in str(exc)
    else:
        raise AssertionError("a second derivative must raise")
    # the node both devices share (csrc/node/), with the backward plan behind it
    assert module(x).grad_fn.name() == "BatchNormBackward (triton_bn C++ launch path)"
    # forward-mode AD has no formula: refused before anything is written, never a tangent dropped
    import torch.autograd.forward_ad as fwAD
    module.train()
    before = module.running_mean.clone()
    with fwAD.dual_level():
        try:
            module(fwAD.make_dual(x.detach(), torch.ones_like(x)))
        except RuntimeError as exc:
            assert "forward-mode AD" in str(exc), exc
        else:
            raise AssertionError("a dual input must raise")
    assert torch.equal(module.running_mean, before)


def check_a_plan_is_per_kind():
    """A call of another kind (another shape, an unaligned input) takes another plan; the alignment of every
    pointer is part of what a plan was made for."""
    torch.manual_seed(0)
    module = triton_bn.BatchNorm2d(6)
    with torch.no_grad():
        x = _input("nchw")
        module(x)
        before = len(cpp_launch._PLANS)
        recorded, _ = recorded_during(lambda: module(x))
        assert len(cpp_launch._PLANS) == before and recorded  # the same kind: the same plan
        wide = torch.randn(4 * 6 * 3 * 5 + 1)
        unaligned = wide[1:].view(4, 6, 3, 5)
        assert unaligned.data_ptr() % 16 != 0
        recorded, _ = recorded_during(lambda: module(unaligned))
        assert len(cpp_launch._PLANS) == before + 1 and recorded
        assert recorded[0]["params"][0] == {"ptr": unaligned.data_ptr()}


def check_errors_before_any_write():
    """A bad call after good ones of its kind: no plan takes it (C++ finds none), functional's checks raise,
    and nothing was launched."""
    torch.manual_seed(0)
    module = triton_bn.BatchNorm2d(6)
    x = _input("channels_last")
    with torch.no_grad():
        module(x)
        cuda_driver.clear()
        for bad, error in ((lambda: triton_bn.batch_norm(x, module.running_mean, module.running_var,
                                                         torch.ones(5), None, True), ValueError),
                           (lambda: triton_bn.batch_norm(x, module.running_mean, module.running_var, module.weight,
                                                         module.bias, True, eps=0.0), ValueError),
                           (lambda: triton_bn.batch_norm(x, module.running_mean, module.running_var, module.weight,
                                                         module.bias, True, activation="tanh"), ValueError)):
            try:
                bad()
            except error:
                pass
            else:
                raise AssertionError("a bad call ran")
        assert cuda_driver.recorded() == []


def check_errors_alike_on_both_paths():
    """Every bad call of tests/bad_calls.py, after good training and eval calls of its kind (so C++ holds
    plans for the good ones and sees the bad one first): the same exception type and message as the Python
    path gives, nothing launched, and every tensor's bytes unchanged."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bad_calls import bad_calls, snapshot, tensors_of
    torch.manual_seed(0)
    for layout in ("channels_last", "nchw"):
        module = triton_bn.BatchNorm2d(6)
        x = _input(layout)
        state = dict(running_mean=module.running_mean, running_var=module.running_var, weight=module.weight,
                     bias=module.bias, num_batches_tracked=module.num_batches_tracked, residual=torch.randn_like(x))
        with torch.no_grad():
            for training in (True, False):  # the plans of the good calls
                for _ in range(2):
                    triton_bn.batch_norm(x, state["running_mean"], state["running_var"], state["weight"],
                                         state["bias"], training, residual=state["residual"],
                                         num_batches_tracked=state["num_batches_tracked"])
        for name, kwargs, error in bad_calls(x, state):
            outcomes = []
            for cpp in (True, False):
                tensors = tensors_of(state, x) + [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
                before = snapshot(tensors)
                cuda_driver.clear()
                with cpp_launch.switched(cpp):
                    try:
                        triton_bn.batch_norm(**kwargs)
                    except Exception as exc:  # noqa: BLE001 - compared below
                        outcomes.append((type(exc), str(exc)))
                    else:
                        raise AssertionError(f"{layout}, {name}: a bad call ran (C++ path: {cpp})")
                assert cuda_driver.recorded() == [], (layout, name, cpp)
                assert snapshot(tensors) == before, f"{layout}, {name}: a tensor changed (C++ path: {cpp})"
            assert outcomes[0] == outcomes[1], (layout, name, outcomes)
            assert outcomes[0][0] is error, (layout, name, outcomes[0])


def check_a_plan_is_per_device():
    """A plan serves the device it was made for, and no other: its arrival counters and compiled functions are
    that device's (on a machine with two GPUs, cuda:1's call launched with cuda:0's buffers would be an illegal
    access). Here the two devices are the CPU and ``meta``: after a CPU call wrote its plans, the same call with
    every tensor on meta finds none in C++ (no launch, no result)."""
    torch.manual_seed(0)
    module = triton_bn.BatchNorm2d(6, activation="relu")
    x = _input("channels_last")
    args = (module.weight, module.bias, None, module.running_mean, module.running_var, module.num_batches_tracked)
    scalars = (module.eps, module.momentum, 0.01, 1, False)
    with torch.no_grad():
        module(x)
        module(x)
        recorded, y = recorded_during(lambda: cpp_launch._training_op(x, *args, *scalars))
        assert y is not None and recorded  # the CPU call's plan serves the CPU call
        on_meta = [None if t is None else t.detach().to("meta") for t in (x,) + args]
        recorded, y = recorded_during(lambda: cpp_launch._training_op(*on_meta, *scalars))
        assert y is None and recorded == [], recorded


def check_entries():
    """Both entries of the forward calls: the one bound directly (csrc/cuda/python.cpp), which cpp_launch.py takes
    wherever Python's headers are, and the torch.ops one it takes elsewhere. The same call launches the same
    kernels with the same parameters through either, a call no plan takes is None through either, and an
    error from C++ arrives as a RuntimeError with the message alone (no C++ backtrace)."""
    torch.manual_seed(0)
    module = triton_bn.BatchNorm2d(6, activation="relu")
    x = _input("channels_last")
    ops = cpp_launch.ops()  # built or loaded here
    dispatcher = cpp_launch._y_or_none(ops.training.default._op)
    if cpp_launch.python_entry_flags()[0]:
        assert cpp_launch._training_op.__module__ == cpp_launch.ENTRY_MODULE, cpp_launch._training_op
        assert cpp_launch._apply_op.__module__ == cpp_launch.ENTRY_MODULE, cpp_launch._apply_op
    args = (x, module.weight, module.bias, None, module.running_mean, module.running_var,
            module.num_batches_tracked, module.eps, module.momentum, 0.01, 1, False)

    def launched(entry):
        recorded, y = recorded_during(lambda: entry(*args))
        assert y is not None and y.shape == x.shape
        return [(r["kernel"], r["grid"], r["block"], r["shared"],
                 [p if "ptr" not in p else p["ptr"] in (x.data_ptr(), module.weight.data_ptr()) for p in r["params"]])
                for r in recorded]
    with torch.no_grad():
        module(x)  # the plans of this kind
        assert launched(cpp_launch._training_op) == launched(dispatcher)
        other = torch.randn(5, 6, 3, 7)  # a kind no check writes plans for: no launch, None
        other_args = (other,) + args[1:]
        for entry in (cpp_launch._training_op, dispatcher):
            recorded, y = recorded_during(lambda entry=entry: entry(*other_args))
            assert y is None and recorded == []
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        try:
            cpp_launch._training_op(dual, *args[1:])
        except RuntimeError as exc:
            assert "forward-mode AD" in str(exc) and "Exception raised from" not in str(exc), str(exc)
        else:
            raise AssertionError("a dual input must raise")


def check_threads():
    """Several threads calling modules of two kinds at once: every call launches its plan's kernels."""
    import threading
    torch.manual_seed(0)
    modules = [triton_bn.BatchNorm2d(6, activation="relu"), triton_bn.BatchNorm2d(6)]
    inputs = [_input("channels_last"), _input("nchw")]
    with torch.no_grad():
        for module, x in zip(modules, inputs):
            module(x)
    cuda_driver.clear()
    errors = []

    def work(i):
        try:
            with torch.no_grad():
                for _ in range(50):
                    modules[i % 2](inputs[i % 2])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert len(cuda_driver.recorded()) == 4 * 50 * 2


def check_plans_follow_the_tuner_and_stay_bounded():
    """A plan launches the tile configuration chosen when it was written: a configuration forced afterwards
    (the tuner's generation moves on) makes the next call write its plans again, with the forced tiles, and
    leaving the block does the same back. PLAN_LIMIT call kinds written: both sides' tables are emptied."""
    from triton_bn.autotune import TileConfig, forced_config, heuristic_config
    torch.manual_seed(0)
    module = triton_bn.BatchNorm2d(6)
    x = _input("channels_last")
    with torch.no_grad():
        module(x)
        before, _ = recorded_during(lambda: module(x))
        geometry = dense_geometry(x)[1]
        usual = heuristic_config("channels_last", "apply", geometry, x.element_size())
        forced = TileConfig(block_a=usual.block_a * 2, block_b=usual.block_b, num_warps=usual.num_warps * 2)
        with forced_config("channels_last.apply", forced):
            during, _ = recorded_during(lambda: module(x))
        after, _ = recorded_during(lambda: module(x))
    apply_blocks = [[launch["block"] for launch in launches if launch["kernel"].startswith("_bn_fwd_apply")]
                    for launches in (before, during)]
    assert apply_blocks == [[usual.num_warps * 32], [forced.num_warps * 32]], apply_blocks
    assert [launch["block"] for launch in after] == [launch["block"] for launch in before], (after, before)

    limit = cpp_launch.PLAN_LIMIT
    cpp_launch.PLAN_LIMIT = 3
    try:
        with torch.no_grad():
            for channels in range(2, 8):  # six call kinds: the tables never hold more than three
                triton_bn.BatchNorm2d(channels)(torch.randn(2, channels, 3, 3))
                assert 1 <= len(cpp_launch._PLANS) <= 3, len(cpp_launch._PLANS)
            recorded, _ = recorded_during(lambda: module(x))  # a kind forgotten: written again, still served
            assert recorded and len(cpp_launch._PLANS) <= 3
    finally:
        cpp_launch.PLAN_LIMIT = limit


CHECKS = {
    **{f"training-{layout}-{act}-{'residual' if res else 'plain'}-{'grad' if grad else 'nograd'}":
       (lambda layout=layout, act=act, res=res, grad=grad: check_training_forward(layout, act, res, grad))
       for layout in SHAPES for act in (None, "relu", "silu") for res in (False, True) for grad in (False, True)
       if not (layout.startswith("bn1d") and act == "silu")},
    **{f"eval-{layout}-{act}": (lambda layout=layout, act=act: check_eval_and_frozen(layout, act))
       for layout in ("channels_last", "nchw", "bn1d") for act in (None, "gelu")},
    "sync-local": check_sync_local_path,
    "node": check_node,
    "plan-per-kind": check_a_plan_is_per_kind,
    "errors": check_errors_before_any_write,
    "errors-alike": check_errors_alike_on_both_paths,
    "plan-per-device": check_a_plan_is_per_device,
    "entries": check_entries,
    "threads": check_threads,
    "plans-current": check_plans_follow_the_tuner_and_stay_bounded,
}

if __name__ == "__main__":
    names = sys.argv[1:] or list(CHECKS)
    for name in names:
        if name == "--list":
            print("\n".join(CHECKS))
            continue
        CHECKS[name]()
        print("ok", name, flush=True)
    print(json.dumps({"checked": len(names)}))
