"""Pictures: figures of volumes, patches and learning curves (plotting.py, numpy and matplotlib only),
and what `medseg show` draws (show.py)."""
