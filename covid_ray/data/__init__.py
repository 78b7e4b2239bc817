"""Dataset layer: scan, split, synthesize, cache and transform chest radiographs."""
