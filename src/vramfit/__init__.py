"""vramfit: will this model fit in my GPU's memory, and how much headroom is left?"""

__version__ = "0.1.0"
