"""Model selection on cross-validation: configurations, ensembles and post-processing (``autoseg select``)."""
