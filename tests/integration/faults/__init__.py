"""The fault battery: real node processes, injected faults, and an observer that counts."""
