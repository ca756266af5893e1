"""Images, datasets, fingerprint, preprocessing and its inverse, resampling, splits, metrics."""
