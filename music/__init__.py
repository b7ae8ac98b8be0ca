"""MUSIC: Make Unification Simple In Image Classification."""
