"""Scoring masks against the truth: overlap and surface metrics (:mod:`.metrics`), lesion-wise
matching (:mod:`.lesions`), folders of masks scored into summary.json and metrics.csv
(:mod:`.evaluate`), and the post-processing steps whose effect ``select`` scores (:mod:`.postprocessing`)."""
