"""``python -m triton_bn bench ...`` (the same as the ``triton-bn`` console script)."""
import sys

from triton_bn.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
