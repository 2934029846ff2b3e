"""Plumbing every stage shares, with no pipeline knowledge of its own: the error users see (errors),
safe file writes and stage tables (fsutil), scratch that killed runs do not leave behind (scratch),
numbers read from untrusted files (numbers), background processes (procs), and training state
saved as data only (tensor_tree)."""
