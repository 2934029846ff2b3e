"""Easel: one module per pipeline stage plus the shared pieces they use."""
