"""The network and its losses."""
