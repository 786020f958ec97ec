"""Coverage-guided fuzzing with atheris (RELIABILITY R19): see targets.py."""
