"""Adapters to inference frameworks (optional extras).

``kvcache.integrations.transformers``: a Hugging Face transformers ``Cache``
and attention implementation (``pip install 'kvcache[hf]'``).
"""
