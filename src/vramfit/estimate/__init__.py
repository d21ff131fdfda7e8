"""Pure estimation: config in, integers (parameter counts, bytes) out. No I/O, no torch."""
