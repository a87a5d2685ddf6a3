"""Measurements of pretrained models: zero-shot prediction (``aion zeroshot``)."""
