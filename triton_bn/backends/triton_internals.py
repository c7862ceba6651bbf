"""Every use of Triton's unpublished API, in one place, with the versions each was written against.

The C++ launch path (``cpp_launch.py``) and the occupancy probe (``occupancy.py``) need what Triton does not
publish: a compiled variant's loaded function handle and register count, the parameter list it was compiled
with after specialisation, and, for the stand-in drivers, Triton's own binder, to compile a kernel for sm_90 on
a CPU-only machine exactly as a launch would specialise it. Written against Triton 3.6 (the GPU image) and 3.9
(CI); ``tests/test_compile_sm90.py`` and ``tests/test_launch.py`` run them on the installed version. Where
versions differ, the branch is here, named, and nowhere else; a new Triton release is checked by those
tests and adapted here.
"""
from typing import Dict

import triton

VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])

# A bool (i1) kernel parameter is passed as an int8 from Triton 3.5 on, as an int32 before: the width its
# launcher packs, which a plan must match (cpp_launch.check_abi compares it with the PTX's declaration).
BOOL_AS_INT8 = VERSION >= (3, 5)


def load(compiled) -> None:
    """Load a compiled variant's module onto the current GPU (what its first launch does): the function
    handle and the register count exist only from then on."""
    compiled._init_handles()


def function_handle(compiled) -> int:
    """The CUfunction of a compiled variant, as an integer (loaded first)."""
    load(compiled)
    return int(compiled.function)


def register_count(compiled) -> int:
    """Registers per thread of a compiled variant (known only from the loaded binary)."""
    load(compiled)
    return compiled.n_regs


def specialised_signature(compiled) -> Dict[str, str]:
    """Parameter name -> Triton type as the variant was compiled ("*fp32", "i32", "fp32", ...), "constexpr" for
    a parameter specialised away (a constexpr, an int equal to 1, None): those are not passed at launch.
    (The constants' keys are parameter names before Triton 3.3 and tuples of parameter indices from 3.3 on.)"""
    signature = dict(compiled.src.signature)
    for key in compiled.src.constants:
        signature[key if isinstance(key, str) else compiled.src.fn.arg_names[key[0]]] = "constexpr"
    return signature


def compile_as_launched(kernel, args, kwargs, target):
    """``kernel`` compiled for ``target`` (a ``GPUTarget``) on this machine, specialised as ``JITFunction.run``
    specialises ``args`` (ints equal to 1 become constexprs; 16-divisible ints and 16-byte aligned pointers get
    divisibility attributes): Triton's binder and argument packing, as a launch calls them."""
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
