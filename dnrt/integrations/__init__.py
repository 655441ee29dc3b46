"""DNRT with other libraries' models and trainers; each submodule imports its library (``import dnrt`` imports none).

``dnrt.integrations.hf``: Hugging Face transformers (extra ``dnrt[hf]``).
"""
