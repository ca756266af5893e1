"""Synthetic phantoms (brain tumour, CT, DICOM series) written as real datasets: ``autoseg demo``'s data
and the tests'. Not on any product path: only the demo command imports it."""
