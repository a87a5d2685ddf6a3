"""A physically grounded mock universe written in the Multimodal Universe layout."""
