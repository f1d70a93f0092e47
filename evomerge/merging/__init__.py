"""Merging: recipes, architectures, the layout of a merge, model files, the merge methods and kernels, the in-place engine and the merge to disk."""
