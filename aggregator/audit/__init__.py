"""Audit: replay retained updates, show a version's lineage, export a version."""
