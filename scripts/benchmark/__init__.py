"""The parts of ``scripts/bench.py``: Conveyor beside its peers, same run, same machine."""
