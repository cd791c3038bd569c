"""Experiment configs: `python -m annotate.main --config=configs/<model>_<loss>.py`."""
