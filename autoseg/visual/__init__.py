"""Pictures of cases and runs: ``autoseg show`` and the demo's overview."""
