"""Search-space presets. Shipped inside the wheel as the package evomerge.search_spaces."""
