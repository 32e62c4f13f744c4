"""Mutation testing of the test suite: a curated mutant list (catalog) and its runner; not part of CI."""
