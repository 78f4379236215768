"""Custom ops of the lab's methods: each a pure-PyTorch reference plus, where it pays, a fast path.

The import name is `lab_kernels`, not `kernels`: Hugging Face's `kernels` distribution (a dependency of
transformers since 5.25) installs an import package `kernels`, and any folder of that name at the repository root
would shadow it for every command run from there (where the README, the tests and `ray job submit --working-dir .`
run), breaking every diffusers pipeline import. tests/test_packaging.py checks both packages in one process.
"""
