"""The compose file for real: a private Docker engine, images built from
Debian's packages and the project's Dockerfile, ``docker compose up`` and
``docker stack deploy`` (tests/deploy/test_compose.py, ``make compose-test``)."""
