"""aion: an open multimodal foundation model for astronomy."""

__version__ = "0.1.0"
