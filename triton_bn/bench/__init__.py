"""``triton-bn bench``: side-by-side timings of triton_bn against PyTorch eager (cuDNN and native) and
torch.compile, with efficiency against a copy measured in the same run. See ``cli.py``."""
