"""Model definitions in the original Wan checkpoint layout."""
