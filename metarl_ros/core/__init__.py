"""Foundations every other subpackage may import: errors, schema, paths, files, logging."""
