"""Quantization-aware fine-tuning with a straight-through estimator, on the PTQ data budget.

Not built yet (tracked as its own issue); it will reuse `ptq.formats` for its fake quantization.
"""
