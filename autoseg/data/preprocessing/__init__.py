"""From a raw case to the network's grid and back: the fingerprint, crop, normalise, resample
(:mod:`.pipeline`, with the :class:`~.pipeline.PreprocessingRecord` of what was done) and its
inverse (:mod:`.restore`)."""
