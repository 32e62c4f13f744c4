"""Bridges to other training libraries. Each submodule imports its library lazily: ``vigor.integrations.trl``
needs ``trl`` installed, ``import vigor`` never does."""
