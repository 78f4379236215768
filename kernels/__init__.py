"""Custom ops of the lab's methods: each a pure-PyTorch reference plus, where it pays, a fast path.

Not to be confused with Hugging Face's `kernels` distribution, which installs an import package of the same
name: this package belongs to the `lab-orchestrator` distribution, so `transformers` and `diffusers` (which look
the name up by distribution metadata) do not mistake it for theirs; tests/test_packaging.py checks that.
"""
