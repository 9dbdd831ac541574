"""Built-in backbone plugins: one public module per backbone, found by scanning this package.

Modules whose names start with ``_`` hold shared network code and are not scanned.
"""
