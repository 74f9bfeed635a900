"""Real hosts for the test tiers, built offline from the source snapshots in ``../shared/hosts``.

``python -m tests.hosts setup a1111`` (or ``forge``) unpacks a host and builds its venv once per tarball and recipe;
``python -m tests.hosts run forge`` starts its full UI with this repository installed. See ``setup.py``.
"""
