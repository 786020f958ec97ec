"""The compose topology without Docker: ``python -m deploy.local.topology``."""
