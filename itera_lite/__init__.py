"""Itera-Lite: tiny SSM+MoE language models (models, data, training)."""
__version__ = "0.1.0"
