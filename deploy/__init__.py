"""Deployment files, and the harness that proves them on loopback (deploy/local)."""
