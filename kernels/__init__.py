"""fastgpt's Triton kernels, imported as ``fastgpt.kernels`` (never as top-level ``kernels``).

Keep this file cheap and free of side effects: no Triton import here. When the
repository root is on sys.path, ``import transformers`` may import this folder
while probing for Hugging Face's own ``kernels`` package. Each kernel module
imports Triton itself and is loaded lazily by ``fastgpt/ops.py``.
"""
