"""The prepared GPU run (run_all.sh / run_all.py) and its wheel bundle (bundle.sh)."""
