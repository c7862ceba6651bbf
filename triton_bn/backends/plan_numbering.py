"""The numbers the C++ launch path (``csrc/cuda/``) and the Python that writes its plans (``cpp_launch.py``)
share, in one place: ``python tools/plan_header.py`` writes ``csrc/cuda/plan_ids.h`` from this file (the C++
enums, and static_asserts that the dtype numbers are c10's), and ``tests/test_launch.py`` fails while the
header is not this file's. Nothing here imports anything, so the script reads it without torch or triton.
"""

# Every tensor a plan can name (enum Slot): the call's inputs, the saved statistics (eval: the running ones),
# the outputs and the backward's input; then per-call fp32 scratch (partials, sums) allocated from the plan's
# sizes, and the buffers a plan holds (arrival counters, the dummy).
X, RESIDUAL, WEIGHT, BIAS, RUNNING_MEAN, RUNNING_VAR, NUM_BATCHES, MEAN, STAT, Y, GRAD_Y, GRAD_X, GRAD_RESIDUAL, \
    GRAD_WEIGHT, GRAD_BIAS = range(15)
FIRST_SCRATCH, FIRST_PERSISTENT, SLOTS = 16, 32, 48

# How a plan allocates an output slot (enum Allocation).
LIKE_X, PER_CHANNEL, LIKE_WEIGHT, LIKE_BIAS, SCRATCH = range(5)

# How a kernel parameter is packed (enum ParamKind): Triton's types after specialisation.
POINTER, I32, I64, F32, I8, NULL_POINTER = range(6)

# The fp32 parameters that come from the call (enum CallScalar: their index in the op's scalars), by kernel
# parameter name; the others (1 / n, n / (n - 1)) follow from the shape and are constants of the plan.
EPS, MOMENTUM, NEGATIVE_SLOPE = range(3)
CALL_SCALARS = {"eps": EPS, "momentum": MOMENTUM, "negative_slope": NEGATIVE_SLOPE}

# Each C++ enum's members, in order (C++ names: X -> kX, RUNNING_MEAN -> kRunningMean).
ENUMS = {
    "Slot": ("X", "RESIDUAL", "WEIGHT", "BIAS", "RUNNING_MEAN", "RUNNING_VAR", "NUM_BATCHES", "MEAN", "STAT", "Y",
             "GRAD_Y", "GRAD_X", "GRAD_RESIDUAL", "GRAD_WEIGHT", "GRAD_BIAS", "FIRST_SCRATCH", "FIRST_PERSISTENT",
             "SLOTS"),
    "Allocation": ("LIKE_X", "PER_CHANNEL", "LIKE_WEIGHT", "LIKE_BIAS", "SCRATCH"),
    "ParamKind": ("POINTER", "I32", "I64", "F32", "I8", "NULL_POINTER"),
    "CallScalar": ("EPS", "MOMENTUM", "NEGATIVE_SLOPE"),
}

# c10::ScalarType's number of each dtype a plan checks: torch dtype name -> (c10 name, number).
SCALAR_TYPES = {"float32": ("Float", 6), "float16": ("Half", 5), "bfloat16": ("BFloat16", 15),
                "float64": ("Double", 7), "int64": ("Long", 4), "int32": ("Int", 3)}
