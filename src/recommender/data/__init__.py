"""Data: readers, built-in datasets, vocabularies, splits, negative sampling, batches."""
