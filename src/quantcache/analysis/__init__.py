"""Evaluation, layer sensitivity, bit allocation and reports."""
