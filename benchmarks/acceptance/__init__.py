"""The GPU acceptance run of benchmarks/gpu_acceptance.py: one module per claim, each with its ``STEP``.

``plan`` (what a run does, GPU or dry run), ``runner`` (steps in order, budgets, failures recorded), ``report``
(the environment, JSON and Markdown), ``context`` (what steps share); the steps in the order they run:
``weights``, ``pytest_gpu``, ``production``, ``speed``, ``pixel_budget``, ``oom``, ``torch_compile``,
``training``, ``clip_score``, ``fast_mode``. docs/gpu-acceptance.md explains every figure.
"""
