"""Survey data layer: typed batches, Multimodal Universe readers/writers, cross-matching."""
