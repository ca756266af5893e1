"""One module per command: keyword-only functions the CLI calls."""
