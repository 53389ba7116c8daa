"""deep-learning-recommender: Neural Collaborative Filtering, end to end."""

__version__ = "0.1.0"
