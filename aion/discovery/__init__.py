"""Discovery on embeddings: similarity search, outlier scores, maps and residual representations."""
