"""What the entry points run: ``train.py``, ``sample.py``, ``evaluate.py``,
``reconstruct.py`` and ``demo.py`` parse flags and call these modules."""
